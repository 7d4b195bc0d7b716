"""
Typed configuration for both daemons, parsed and validated once at start-up.

Every error is a :class:`ConfigError` whose message is one line saying what is
wrong and how to fix it; the command-line front ends print it and exit 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration mistake, worded for the operator."""


_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b?)|b)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str, option: str) -> int:
    """``"512"``, ``"64k"``, ``"1.5G"``, ``"10MiB"`` -> bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{option}: {text!r} is not a size; use bytes or a suffix like 64k, 10M, 1.5G")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    return int(number * _UNITS[unit])


def parse_seconds(text: str | float | None, option: str, *, allow_zero: bool = True) -> float | None:
    """A non-negative number of seconds; ``0``/``none``/``off`` mean "no limit" where allowed."""
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lower() in ("none", "off", "inf", "never"):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}: {text!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise ConfigError(f"{option}: must be >= 0, got {text!r}")
    if value == float("inf"):
        return None
    if value == 0:
        if allow_zero:
            return None
        raise ConfigError(f"{option}: must be > 0")
    return value


def parse_count(text: str | int | None, option: str, *, minimum: int = 0) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}: {text!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{option}: must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class HubConfig:
    """Everything the hub needs to run."""

    listen: tuple[str, ...] = ("tcp:8080",)
    workers: tuple[str, ...] = ("tcp:4040",)
    #: Seconds a job may wait in the queue before a 503 (None: forever).
    queue_timeout: float | None = None
    #: Waiting jobs beyond which new requests get 503 at once (None: unbounded).
    max_queue: int | None = None
    #: Largest accepted request body in bytes.
    max_body: int = 1024**3
    #: Largest request line plus headers in bytes.
    max_header_bytes: int = 16384
    #: Seconds SIGTERM waits for queued and in-flight jobs before giving up.
    drain_timeout: float = 30.0
    #: Seconds after which an idle consumer connection is closed (None: never).
    consumer_idle_timeout: float | None = 60.0
    #: Seconds from a request's first byte until its head is complete, else 408 (None: no limit).
    header_timeout: float | None = 10.0
    #: Seconds a worker may send nothing mid-body (while the consumer reads) before the job is aborted.
    worker_stall_timeout: float | None = 300.0
    #: Open consumer connections beyond which new ones get 503 and a close (None: no cap).
    max_connections: int | None = 10000
    #: ``Retry-After`` seconds sent with queue-timeout and queue-full 503s.
    retry_after: int = 5
    #: Keep X-Forwarded-Proto/-Host set by a proxy in front (else the hub's own view).
    trust_forwarded: bool = False
    #: Endpoint for /metrics, /healthz and /readyz (None: not served).
    metrics: str | None = None
    #: PROMETHEUS_MULTIPROC_DIR (already wiped), for the multiprocess view.
    multiprocess_dir: str | None = None
    #: Shared secret workers must present in the PTTH upgrade (None: no handshake).
    worker_token: bytes | None = None
    #: Endpoint for the operators' ``/status`` view (None: not served).
    admin: str | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to run."""

    connect: tuple[str, ...] = ("tcp:host=localhost:port=4040",)
    app: str = "pothead.demo:app"
    threads: int = 1
    poll_jobs: bool = False
    #: Initial and maximum reconnect delay (seconds) while a hub is unreachable.
    reconnect_initial: float = 0.1
    reconnect_max: float = 10.0
    #: Keep worker connections open between jobs (Connection: keep-alive).
    keep_alive: bool = True
    #: Seconds SIGTERM waits for in-flight jobs (None: as long as they take).
    drain_timeout: float | None = None
    #: Endpoint for /metrics, /healthz and /readyz (None: not served).
    metrics: str | None = None
    #: PROMETHEUS_MULTIPROC_DIR (already wiped), for the multiprocess view.
    multiprocess_dir: str | None = None
    #: Token presented to hubs in the PTTH upgrade (None: no handshake).
    worker_token: bytes | None = None
    #: TLS to the hubs: CA file verifying them, optional client certificate and key.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Endpoint of the redirect listener (``--redirect-response``; None: responses go through the hub).
    redirect: str | None = None
    #: ``scheme://host[:port][/prefix]`` put before the key in ``Location`` (None: derived, see redirect.py).
    redirect_url_base: str | None = None
    #: Seconds a parked response waits to be fetched before it is closed.
    redirect_expiry: float = 20.0
    #: Endpoint for the operators' ``/inspect`` and ``/apocalypse`` (None: not served).
    inspect: str | None = None


def parse_url_base(text: str, option: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash, or a one-line error."""
    from urllib.parse import urlsplit

    value = text.strip().rstrip("/")
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{option}: {text!r} is not an http(s) URL like https://media.example.com or http://10.0.0.5:8081")
    return value
