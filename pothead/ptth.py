"""
The authenticated worker handshake (PTTH upgrade), shared by hub and worker.

When the hub has a worker token, a worker's first bytes on a new connection
must be::

    POST /pothead/ptth HTTP/1.1
    Host: <hub>
    Upgrade: PTTH/1.0
    Connection: Upgrade
    Authorization: Bearer <token>
    Content-Length: 0

The hub answers ``101 Switching Protocols`` and only then counts the
connection as ready; anything else gets ``401`` and a close, so no consumer
request ever reaches an unauthenticated peer.  Tokens are compared in
constant time and never logged.

Pure functions: no I/O, no reactor.
"""

from __future__ import annotations

import hmac
import os
import stat

from .config import ConfigError

#: Upper bound of a handshake's head; longer is refused.
MAX_HEAD = 8192
PROTOCOL = b"PTTH/1.0"

SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: PTTH/1.0\r\nConnection: Upgrade\r\n\r\n"


def unauthorized(message: str) -> bytes:
    body = f"401 Unauthorized: {message}\n".encode()
    return (
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


def upgrade_request(token: bytes, host: bytes = b"pothead-hub") -> bytes:
    return (
        b"POST /pothead/ptth HTTP/1.1\r\nHost: %s\r\nUpgrade: PTTH/1.0\r\nConnection: Upgrade\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: 0\r\n\r\n" % (host, token)
    )


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once ``buffer`` holds a complete head (ending in a blank line), else None."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = buffer.find(separator)
        if index >= 0:
            return buffer[:index], buffer[index + len(separator):]
    return None


def _parse(head: bytes) -> tuple[list[bytes], dict[bytes, list[bytes]]]:
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    first = lines[0].split()
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return first, headers


def check_upgrade(head: bytes, token: bytes) -> str | None:
    """None if ``head`` is a valid upgrade carrying ``token``; else why not (safe to log)."""
    try:
        first, headers = _parse(head)
    except ValueError:
        return "malformed handshake"
    if len(first) != 3 or first[0] != b"POST" or not first[2].startswith(b"HTTP/1."):
        return "not a PTTH upgrade request"
    upgrades = [t.strip().lower() for v in headers.get(b"upgrade", []) for t in v.split(b",")]
    if PROTOCOL.lower() not in upgrades:
        return "no Upgrade: PTTH/1.0"
    connection = [t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")]
    if b"upgrade" not in connection:
        return "no Connection: Upgrade"
    authorization = headers.get(b"authorization", [])
    if len(authorization) != 1:
        return "missing Authorization"
    scheme, _, presented = authorization[0].partition(b" ")
    if scheme.lower() != b"bearer":
        return "Authorization is not a Bearer token"
    if not hmac.compare_digest(presented.strip(), token):
        return "wrong token"
    return None


def check_switching(head: bytes) -> str | None:
    """None if the hub's answer ``head`` is 101 to PTTH; else why not."""
    try:
        first, headers = _parse(head)
    except ValueError:
        return "malformed handshake answer"
    if len(first) < 2 or not first[0].startswith(b"HTTP/1."):
        return "not an HTTP answer"
    if first[1] != b"101":
        return f"hub answered {b' '.join(first[1:]).decode('latin-1')}"
    return None


def read_token_file(path: str, option: str) -> tuple[bytes, str | None]:
    """``(token, warning)``: the token in ``path``; a warning if others may read the file."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {path!r}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"{option}: {path!r} is empty; put the shared worker token in it")
    if len(token) < 16:
        raise ConfigError(f"{option}: the token in {path!r} is shorter than 16 bytes; use e.g. `openssl rand -hex 32`")
    if any(c in token for c in b" \t\r\n") or not all(0x21 <= c < 0x7F for c in token):
        raise ConfigError(f"{option}: the token in {path!r} must be printable ASCII without spaces")
    warning = None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = f"{option}: {path} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return token, warning
