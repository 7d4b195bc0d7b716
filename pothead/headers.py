"""
Header rules shared by the hub and the worker: hop-by-hop removal, forwarding
headers and request ids.

Pure functions over ``list[tuple[bytes, bytes]]`` (raw header pairs, names in
any case); no I/O and no reactor, so the rules are unit-tested directly.
"""

from __future__ import annotations

import re
import secrets
from typing import Iterable, Sequence

HeaderList = list[tuple[bytes, bytes]]

#: Headers that describe one connection and never cross a proxy (RFC 9110 7.6.1),
#: plus ``Proxy-*`` which :func:`is_hop_by_hop` matches by prefix.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: Headers that the hub recomputes for the hop to the worker rather than copying:
#: the body is re-framed with its own Content-Length, and ``Expect: 100-continue``
#: has already been answered by the hub.
REFRAMED: frozenset[bytes] = frozenset({b"content-length", b"expect"})

#: RFC 9110 5.6.2 token: the only characters allowed in a method or header name.
TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: A chunk size (RFC 9112 7.1), at most 16 hex digits.
CHUNK_SIZE = re.compile(rb"\A[0-9A-Fa-f]{1,16}\Z")

REQUEST_ID = b"x-request-id"
REQUEUE = b"pothead-requeue"

# A client-supplied request id is kept only if it is short and printable, so it
# can go into logs and headers without escaping surprises.
_SAFE_REQUEST_ID = re.compile(rb"\A[\x21-\x7e]{1,200}\Z")


def is_hop_by_hop(name: bytes) -> bool:
    lowered = name.lower()
    return lowered in HOP_BY_HOP or lowered.startswith(b"proxy-")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The lower-cased tokens of every ``Connection`` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def end_to_end(headers: Sequence[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> HeaderList:
    """
    ``headers`` without hop-by-hop headers, without the headers named in
    ``Connection``, and without the names in ``drop``; order and repeats kept.
    """
    named = connection_tokens(headers)
    dropped = {d.lower() for d in drop}
    return [
        (name, value)
        for name, value in headers
        if not is_hop_by_hop(name) and name.lower() not in named and name.lower() not in dropped
    ]


def new_request_id() -> str:
    """A fresh request id: 128 random bits, hex."""
    return secrets.token_hex(16)


def choose_request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The consumer's ``X-Request-Id`` if it is sane, else a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID:
            value = value.strip()
            if _SAFE_REQUEST_ID.match(value):
                return value.decode("ascii")
            break
    return new_request_id()


def forwarded_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_address: str | None,
    scheme: str,
    host: bytes | None,
    request_id: str,
    reuse: bool = True,
    trust_forwarded: bool = False,
) -> HeaderList:
    """
    The headers the hub sends to a worker for a consumer request: end-to-end
    headers, ``X-Forwarded-For`` extended with the consumer's address (the
    usual chain: only its right end is the hub's own observation),
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` as the hub saw them -- or,
    with ``trust_forwarded`` (the hub runs behind a proxy that sets them),
    kept when present -- and ``X-Request-Id``.  Body framing is not included.
    """
    # Pothead-* headers are the hub's words to the worker; a consumer cannot send them.
    drop = REFRAMED | {REQUEST_ID}
    if not trust_forwarded:
        drop = drop | {b"x-forwarded-proto", b"x-forwarded-host"}
    out = [(n, v) for n, v in end_to_end(headers, drop=drop) if not n.lower().startswith(b"pothead-")]
    have = {name.lower() for name, _ in out}
    if client_address:
        previous = [value for name, value in out if name.lower() == b"x-forwarded-for"]
        out = [(n, v) for n, v in out if n.lower() != b"x-forwarded-for"]
        chain = b", ".join(previous + [client_address.encode("ascii", "replace")])
        out.append((b"X-Forwarded-For", chain))
    if b"x-forwarded-proto" not in have:
        out.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if host is not None and b"x-forwarded-host" not in have:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Request-Id", request_id.encode("ascii")))
    if reuse:
        out.append((b"Pothead-Reuse", b"1"))
    return out


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (case-insensitive), or None."""
    lowered = name.lower()
    for n, v in headers:
        if n.lower() == lowered:
            return v
    return None


def asks_requeue(code: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True for a draining worker's ``503`` + ``Pothead-Requeue: 1``."""
    value = header_value(headers, REQUEUE)
    return code == 503 and value is not None and value.strip() == b"1"


_ABSOLUTE_FORM = re.compile(rb"\A[hH][tT][tT][pP][sS]?://([^/?#]*)([^#]*)\Z")


def origin_form(target: bytes) -> tuple[bytes | None, bytes]:
    """
    ``(authority, origin-form target)`` for an absolute-form request target
    (RFC 9112 3.2.2), ``(None, target)`` for any other form.
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return None, target
    authority, rest = match.groups()
    if not rest.startswith(b"/"):
        rest = b"/" + rest  # "http://h?q" -> "/?q"
    return authority, rest
