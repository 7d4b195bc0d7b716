"""
Shared by the operator listeners (the hub's ``--admin``, the worker's
``--inspect``): JSON-or-text answers, never cached, one response per connection.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def wants_json(request: Request) -> bool:
    args: dict[bytes, list[bytes]] = request.args or {}
    if args.get(b"format", [b""])[0] == b"json":
        return True
    accept = (request.getHeader(b"accept") or b"").lower()
    return b"application/json" in accept


def respond(request: Request, status: dict[str, Any], text: str) -> bytes:
    """The common tail of /inspect and the hub's /status: JSON or text, no caching, one response per connection."""
    if wants_json(request):
        body = (json.dumps(status, indent=2, sort_keys=True) + "\n").encode()
        request.setHeader(b"content-type", b"application/json")
    else:
        body = text.encode("utf-8", "replace")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", str(len(body)).encode())
    close_after(request)
    return body


def close_after(request: Request) -> None:
    # Operator tools open a connection per look; closing keeps nothing idle around.
    request.setHeader(b"connection", b"close")
    if request.channel is not None:
        request.channel.persistent = False
