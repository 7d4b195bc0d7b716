"""
Apps for bench/gating.py, run by ``twistd pothead-worker`` (PYTHONPATH=bench).

Each job hashes a 1 MiB buffer ``POTHEAD_BENCH_ROUNDS`` times with
``hashlib.sha256``: hashlib releases the GIL for buffers this large, so
several threads of one worker process really use several cores (a hash loop
over tiny inputs would hold the GIL and never use more than one).  The
amount of work per job is fixed (bench/gating.py calibrates the rounds to
~0.2 s of CPU on this machine), so throughput is comparable across settings.

The response reports when the job ran (wall clock), its own CPU time and
how many jobs ran in this process when it started.

``fixed_app`` is for ``--threads N``; ``gated_app`` carries
``wait_for_slot = wait_for_idle_cpus(1)`` for ``--poll-jobs``, or, with
``POTHEAD_BENCH_GATE`` set, the same gate with other arguments, used when
investigating it (see ``_gate_from_env``).  The benchmark itself uses
``wait_for_idle_cpus(1)`` as an app would.
``POTHEAD_BENCH_GATE_TRACE=path`` logs every reading and grant of the gate
(it reads the gate's private parts, so it may need updating when they change).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from pothead.gating import CpuGate, wait_for_idle_cpus

CHUNK = 1 << 20
ROUNDS = int(os.environ.get("POTHEAD_BENCH_ROUNDS", "345"))
_BUFFER = bytes(range(256)) * (CHUNK // 256)

_lock = threading.Lock()
_running = 0


def hash_job(rounds: int = ROUNDS) -> bytes:
    digest = b""
    for _ in range(rounds):
        digest = hashlib.sha256(_BUFFER).digest()  # releases the GIL (buffer > 2 KiB)
    return digest


def _job(environ, start_response, gate=None):
    global _running
    with _lock:
        _running += 1
        at_start = _running
    granted = gate.granted if gate is not None and hasattr(gate, "granted") else None
    started = time.time()
    cpu0 = time.thread_time()
    hash_job()
    cpu = time.thread_time() - cpu0
    ended = time.time()
    with _lock:
        _running -= 1
    body = json.dumps(
        {"start": started, "end": ended, "cpu": cpu, "concurrent": at_start, "granted": granted}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def fixed_app(environ, start_response):
    return _job(environ, start_response)


def _gate_from_env():
    """
    ``POTHEAD_BENCH_GATE``: unset -> ``wait_for_idle_cpus(1)`` (the benchmark);
    otherwise ``key=value,...``: keyword arguments for ``wait_for_idle_cpus``
    (``required`` included), e.g. ``tolerance=0`` or ``inertia=0.3`` -- used
    to investigate the gate (``bench/gating.py --gate-variant SPEC``).
    """
    return _make_gate(*_gate_spec(os.environ.get("POTHEAD_BENCH_GATE", "")))


def _gate_spec(spec):
    """'key=value,...' -> (required, keyword arguments)."""
    kwargs = {}
    for part in spec.split(","):
        if part.strip():
            key, _, value = part.partition("=")
            kwargs[key.strip()] = value.strip()
    required = float(kwargs.pop("required", "1"))
    typed = {}
    for key, value in kwargs.items():
        if key == "max_concurrent":
            typed[key] = int(value)
        elif key == "keep_cpu_reservation":
            typed[key] = value.lower() in ("1", "true", "yes")
        else:
            typed[key] = float(value)
    return required, typed


def _make_gate(required, typed, **machine):
    """The gate; ``machine``: CpuGate's injectables (readers, clock, sleep) for bench/gating_sim.py."""
    if machine:
        return CpuGate(required, **typed, **machine)  # what wait_for_idle_cpus builds, with fake readers
    return wait_for_idle_cpus(required, **typed)


def _traced(gate):
    """``POTHEAD_BENCH_GATE_TRACE=path``: log every reading and grant of the gate (investigation)."""
    path = os.environ.get("POTHEAD_BENCH_GATE_TRACE")
    if not path or not isinstance(gate, CpuGate):
        return gate
    out = open(path, "a", buffering=1)

    def log(event, **fields):
        out.write(json.dumps({"t": time.time(), "ev": event, "granted": len(gate._grants), "level": gate.level,
                              "share": gate.cpu_share, **fields}) + "\n")

    sample = gate._sample

    def traced_sample(now, interval):
        sample(now, interval)
        series = gate._series
        log("sample", idle=series.idle.value, used=series.used.value, current=series.current,
            stale=series.based_on != gate._events, reserved=gate._reserved_locked()[0], interval=interval)

    gate._sample = traced_sample

    def traced_call(halt):
        grant = gate.wait_for_slot(halt)
        log("grant")
        done = grant.done

        def traced_done():
            done()
            log("done")

        grant.done = traced_done
        return grant

    return traced_call


def gated_app(environ, start_response):
    return _job(environ, start_response, _GATE)


_GATE = _gate_from_env()
gated_app.wait_for_slot = _traced(_GATE)  # type: ignore[attr-defined]
