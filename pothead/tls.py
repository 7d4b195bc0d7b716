"""
TLS for the worker's hub connections, from files an operator has at hand.

The hub's side needs nothing of ours: its ports are endpoint strings, e.g.
``--workers ssl:4040:privateKey=hub.key:certKey=hub.crt``.  Twisted's
``ssl:`` server endpoint string cannot *require* client certificates, so
workers authenticate with the worker token (``--worker-token-file``); a
client certificate (``--tls-cert``) is presented but not enforced by the hub.
Twisted's own ``tls:`` client endpoint wants a *directory* of CAs, so the
worker takes ``--tls-ca FILE`` (and ``--tls-cert``/``--tls-key`` for a client
certificate) and wraps each ``--connect`` address in TLS that verifies the
hub's certificate against that CA and the hub's host name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ConfigError


@dataclass(frozen=True)
class ClientTLS:
    """What the worker needs to talk TLS to its hubs."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None

    def wrap(self, endpoint: Any, hostname: str) -> Any:
        """``endpoint`` wrapped in TLS verifying ``hostname`` against the CA."""
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

        ca = Certificate.loadPEM(_read(self.ca_file, "--tls-ca"))
        client = None
        if self.cert_file is not None:
            cert = _read(self.cert_file, "--tls-cert")
            key = _read(self.key_file, "--tls-key") if self.key_file is not None else cert
            try:
                client = PrivateCertificate.loadPEM(cert + b"\n" + key)
            except Exception as e:
                raise ConfigError(f"--tls-cert/--tls-key: cannot load the client certificate and key: {e}") from None
        return wrapClientTLS(optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=client), endpoint)


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {path!r}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{option}: {path!r} is not a PEM file")
    return data


def client_tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ClientTLS | None:
    """Validate the worker's TLS options once, at start-up."""
    if ca_file is None:
        if cert_file is not None or key_file is not None:
            raise ConfigError("--tls-cert/--tls-key need --tls-ca (the CA that signed the hub's certificate)")
        return None
    if key_file is not None and cert_file is None:
        raise ConfigError("--tls-key needs --tls-cert")
    tls = ClientTLS(ca_file, cert_file, key_file)
    _read(ca_file, "--tls-ca")
    if cert_file is not None:
        _read(cert_file, "--tls-cert")
    if key_file is not None:
        _read(key_file, "--tls-key")
    return tls
