"""
The WSGI app of the interoperability tests.

It is imported in-process by our worker and copied into a temporary directory
(as ``interop_app``) for the original POTHEAD worker, so it must only use the
standard library and must work on both.

* ``/status/CODE`` -- answers CODE with reason "Custom Reason", ``X-Custom: teapot``
  and two ``Set-Cookie`` headers;
* ``/sleep?seconds=S`` -- sleeps S seconds (max 10) first;
* ``/stream?chunks=N`` -- N chunks, no Content-Length (chunked on the wire);
* ``/big?size=N`` -- N bytes of a known pattern;
* anything else -- a JSON description of the request it got.
"""

import hashlib
import json
import os
import time
from urllib.parse import parse_qs

_FORWARDED = (
    "HTTP_X_REQUEST_ID",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_POTHEAD_REUSE",
    "HTTP_HOST",
    "HTTP_X_CUSTOM_IN",
    "HTTP_CONNECTION",
    "CONTENT_LENGTH",
    "CONTENT_TYPE",
)


def pattern(size):
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


def _query(environ, name, default, maximum):
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    try:
        return max(0.0, min(maximum, float(values[0]))) if values else default
    except ValueError:
        return default


def _connection_port(environ):
    """The local port of the worker's connection to the hub: a new value means a new connection."""
    sock = environ.get("werkzeug.socket")  # the original worker (werkzeug)
    if sock is not None:
        return sock.getsockname()[1]
    return int(environ.get("SERVER_PORT") or 0)  # twisted.web.wsgi: the local end


def describe(environ, started):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    return {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("PATH_INFO", ""),
        "query": environ.get("QUERY_STRING", ""),
        "body": body.decode("latin-1") if len(body) <= 4096 else None,
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "headers": {key: environ[key] for key in _FORWARDED if environ.get(key)},
        "request_id": environ.get("REQUEST_ID"),
        "connection_port": _connection_port(environ),
        "pid": os.getpid(),
        "started": started,
        "finished": time.time(),
    }


def app(environ, start_response):
    started = time.time()
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        body = json.dumps(describe(environ, started)).encode()
        start_response(
            "%d Custom Reason" % code,
            [
                ("Content-Type", "application/json"),
                ("X-Custom", "teapot"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]
    if path == "/stream":
        chunks = int(_query(environ, "chunks", 3, 1000))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"chunk %d;" % i for i in range(chunks)]
    if path == "/big":
        body = pattern(int(_query(environ, "size", 1024, 64 * 1024 * 1024)))
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/sleep":
        time.sleep(_query(environ, "seconds", 1.0, 10.0))
    body = json.dumps(describe(environ, started)).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
