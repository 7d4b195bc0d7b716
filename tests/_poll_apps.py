"""Apps for tests/test_poll_jobs.py, run by twistd pothead-worker --poll-jobs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from pothead.gating import wait_for_free_memory, wait_for_idle_cpus

_lock = threading.Lock()
_running = 0


def _cpu_job(environ, start_response):
    """~0.2 s of pure-Python hashing; reports when it ran and how many ran with it."""
    global _running
    with _lock:
        _running += 1
        at_start = _running
    started = time.time()
    digest = b"x"
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()
    ended = time.time()
    with _lock:
        _running -= 1
    body = json.dumps(
        {
            "start": started,
            "end": ended,
            "concurrent": at_start,
            "pid": os.getpid(),
            "reset": "RESET_CPU_RESERVATION" in environ,
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def cpu_app(environ, start_response):
    return _cpu_job(environ, start_response)


cpu_app.wait_for_slot = wait_for_idle_cpus(1)  # type: ignore[attr-defined]


def memory_app(environ, start_response):
    return _cpu_job(environ, start_response)


# Asks for more memory than any machine has: only the first job (which every
# gate always admits) may run; the rest wait for it.
memory_app.wait_for_slot = wait_for_free_memory(1 << 50)  # type: ignore[attr-defined]


class _NeverGate:
    """Grants the first slot, then blocks until halt()."""

    def __init__(self) -> None:
        self.granted = 0

    def __call__(self, halt):
        if self.granted == 0:
            self.granted += 1
            return None
        while not halt():
            time.sleep(0.05)
        return None


def blocked_app(environ, start_response):
    body = b"ok"
    start_response("200 OK", [("Content-Length", "2")])
    return [body]


blocked_app.wait_for_slot = _NeverGate()  # type: ignore[attr-defined]


def original_app(environ, start_response):
    """An app as written for the original POTHEAD: its gate line, unchanged."""
    return _cpu_job(environ, start_response)


original_app.wait_for_slot = wait_for_idle_cpus(3)  # type: ignore[attr-defined]
