"""
A small WSGI app for trying pothead (``make demo``) and for tests.

* ``/`` -- a greeting naming the worker process and the request id;
* ``/sleep?seconds=S`` -- holds its slot for S seconds (max 60), like an expensive job;
* ``/echo`` -- returns the request body;
* ``/hash?rounds=N`` -- burns CPU with N rounds of SHA-256 (max 10,000,000).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs


def _number(environ: dict[str, Any], name: str, default: float, maximum: float) -> float:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    try:
        return max(0.0, min(maximum, float(values[0]))) if values else default
    except ValueError:
        return default


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    request_id = environ.get("REQUEST_ID", "-")
    if path == "/sleep":
        seconds = _number(environ, "seconds", 1.0, 60.0)
        time.sleep(seconds)
        body = f"slept {seconds:g}s in worker pid {os.getpid()} (request id {request_id})\n".encode()
    elif path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
    elif path == "/hash":
        rounds = int(_number(environ, "rounds", 100000, 10_000_000))
        digest = b"pothead"
        for _ in range(rounds):
            digest = hashlib.sha256(digest).digest()
        body = f"{digest.hex()} after {rounds} rounds (request id {request_id})\n".encode()
    else:
        body = (
            f"Hello from pothead worker pid {os.getpid()}\n"
            f"request id: {request_id}\n"
            f"try /sleep?seconds=2, /hash?rounds=200000 or POST to /echo\n"
        ).encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
