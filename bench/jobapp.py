"""
The benchmark's job: one small WSGI app, served unchanged by every system.

* ``/job?ms=X`` -- hold a per-process lock for X milliseconds (``time.sleep``
  inside the lock) and answer ``ok <pid>``, so a job costs no CPU and a worker process never runs two
  jobs at once, whatever its server does (a threaded backend behind HAProxy
  ``roundrobin`` queues extra requests on the lock, as a real single-job
  worker would);
* ``/upload`` -- read the request body in 64 KiB pieces and answer its length;
* ``/download?bytes=N`` -- stream N bytes (64 KiB pieces, at most 4 GiB).

Standard library only: the original POTHEAD's worker imports it with its own
interpreter from a temporary directory.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

LOCK = threading.Lock()
PIECE = 65536
ZEROS = bytes(PIECE)
PID = os.getpid()


def _param(environ: dict[str, Any], name: str, default: float) -> float:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    try:
        return float(values[0]) if values else default
    except ValueError:
        return default


def _download(total: int) -> Iterator[bytes]:
    left = total
    while left > 0:
        piece = ZEROS if left >= PIECE else ZEROS[:left]
        left -= len(piece)
        yield piece


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/upload":
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH") or ""
        left = int(length) if length.isdigit() else None
        seen = 0
        with LOCK:
            while left is None or left > 0:
                piece = stream.read(PIECE if left is None else min(PIECE, left))
                if not piece:
                    break
                seen += len(piece)
                if left is not None:
                    left -= len(piece)
        body = b"%d\n" % seen
    elif path == "/download":
        total = int(max(0.0, min(_param(environ, "bytes", 0), 4 * 2**30)))
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(total))])
        return _download(total)
    else:
        ms = max(0.0, min(_param(environ, "ms", 0.0), 600_000.0))
        with LOCK:
            if ms:
                time.sleep(ms / 1000.0)
        body = b"ok %d\n" % PID
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
