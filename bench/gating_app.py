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
``POTHEAD_BENCH_GATE`` set, a variant used when investigating the gate
(see ``_gate_from_env``; the variants subclass pothead.gating's CpuGate and
use its private parts, so they may need updating when it changes -- the
benchmark itself uses only ``wait_for_idle_cpus``).
``POTHEAD_BENCH_GATE_TRACE=path`` logs every reading and grant of the gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from pothead.gating import wait_for_idle_cpus

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
    (``required`` included) and ``variant=carry|restart|level`` with its
    ``tolerance`` -- experiments used to investigate the gate, not part of
    pothead (see the ``_*_gate`` functions).
    """
    return _make_gate(*_gate_spec(os.environ.get("POTHEAD_BENCH_GATE", "")))


def _gate_spec(spec):
    """'key=value,...' -> (variant, required, keyword arguments)."""
    kwargs = {}
    for part in spec.split(","):
        if part.strip():
            key, _, value = part.partition("=")
            kwargs[key.strip()] = value.strip()
    variant = kwargs.pop("variant", "")
    required = float(kwargs.pop("required", "1"))
    typed = {}
    for key, value in kwargs.items():
        if key == "max_concurrent":
            typed[key] = int(value)
        elif key == "keep_cpu_reservation":
            typed[key] = value.lower() in ("1", "true", "yes")
        else:
            typed[key] = float(value)
    return variant, required, typed


def _make_gate(variant, required, typed, **machine):
    """The gate; ``machine``: CpuGate's injectables (readers, clock, sleep) for bench/gating_sim.py."""
    typed = dict(typed)
    if variant == "carry":
        return _carry_gate(required, **typed, **machine)
    if variant == "restart":
        tolerance = typed.pop("tolerance", 0.1)
        return _restart_gate(required, tolerance, **typed, **machine)
    if variant == "level":
        tolerance = typed.pop("tolerance", 0.1)
        return _restart_gate(required, tolerance, level=True, **typed, **machine)
    if variant:
        raise ValueError(f"unknown gate variant {variant!r}")
    if machine:
        from pothead.gating import CpuGate

        return CpuGate(required, **typed, **machine)  # what wait_for_idle_cpus builds, with fake readers
    return wait_for_idle_cpus(required, **typed)


def _carry_gate(required, **kwargs):
    """An experiment: waits start from the gate's latest smoothed readings instead of "nothing idle"."""
    from pothead.gating import CpuGate, _CpuReadings

    class _CarryReadings(_CpuReadings):
        def __init__(self, gate, now, interval):
            super().__init__(gate, now, interval)
            if gate.idle_cpus is not None:
                self.idle.smoothed.value = gate.idle_cpus
                self.used.smoothed.value = gate.used_cpus
                # Trust carried readings at once: the reservations cover jobs not started yet.
                self.samples = 1

    class CarryGate(CpuGate):
        def _begin(self, now, interval):
            return _CarryReadings(self, now, interval)

    return CarryGate(required, **kwargs)


def _restart_gate(required, tolerance, level=False, read_own=None, **kwargs):
    """
    An experiment (not part of pothead): a CpuGate whose smoothing restarts at
    known steps.  A job starting (request received) or ending is a step
    change of CPU use; averaging readings across it only delays the gate.  So
    after such an event the readings are stale: the next sample only rebases
    the counters (at once), the one after it (one poll interval later) sets
    the smoothed value to its raw reading, and smoothing resumes from there.
    Waits start from the gate's latest readings (not from "nothing idle"):
    a granted-not-started job is covered by its reservation, and its start
    is an event.  ``(1 - tolerance) * required`` idle CPUs count as enough.

    With ``level``: the gate also remembers how many concurrent jobs the
    readings have vouched for (``level``: the count it reached when it last
    admitted on readings) and refills a released slot at once, without
    waiting for readings, while its running jobs each get at least
    ``(1 - tolerance) * required`` CPUs -- measured as our own CPU time
    (``read_own``: this process and its children) per job-second, smoothed,
    which other load cannot fake.  When jobs get less (other load came, or
    they block on I/O), ``level`` drops to one below the number running, and
    only the readings can raise it again.
    """
    from pothead.gating import CpuGate, ReservationGrant, _CpuReadings

    class _Readings(_CpuReadings):
        def __init__(self, gate, now, interval):
            super().__init__(gate, now, interval)
            self.fresh = gate.idle_cpus is None  # next sample replaces the smoothed value
            if gate.idle_cpus is not None:
                self.idle.smoothed.value = gate.idle_cpus
                self.used.smoothed.value = gate.used_cpus
                self.samples = 1
            # The carried readings are as old as the gate's latest baseline.
            self.based_at = gate.based_at if gate.idle_cpus is not None else now

        def stale(self):
            return self._gate.event_at >= self.based_at

        def sample(self, now):
            gate = self._gate
            gate.sample_share()
            if self.stale():
                # Rebase: measure from now on; the next sample stands alone.
                self.idle.update(gate._read_idle(), now)  # moves the baseline
                self.used.update(gate._read_used(), now)
                self.idle.smoothed.value, self.used.smoothed.value = gate.idle_cpus or 0.0, gate.used_cpus or 0.0
                self.based_at = now
                self.fresh = True
                self.next_sample_at = now + self._interval
                return
            gate.based_at = self.based_at
            if self.fresh:
                inertia = (self.idle.smoothed.inertia, self.used.smoothed.inertia)
                self.idle.smoothed.inertia = self.used.smoothed.inertia = 0.0
                super().sample(now)
                self.idle.smoothed.inertia, self.used.smoothed.inertia = inertia
                self.fresh = False
            else:
                super().sample(now)

    class _Grant(ReservationGrant):
        started = False

        def request_received(self, environ):
            self.gate._event()  # before the reservation goes: a waiter must see stale readings
            self.gate._job_started(self)
            super().request_received(environ)

    class RestartGate(CpuGate):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.event_at = -1.0
            self.based_at = -1.0
            # level: jobs the readings vouched for; share: own CPU per running job (smoothed)
            self.level = 0
            self.running = 0
            self.share = None
            self._acct = threading.Lock()
            self._job_seconds = 0.0
            self._acct_at = self._clock()
            self._read_own = read_own or _own_cpu_seconds
            self._share_base = None

        def _event(self):
            self.event_at = self._clock()

        def _account(self, delta):
            with self._acct:
                now = self._clock()
                self._job_seconds += self.running * (now - self._acct_at)
                self._acct_at = now
                self.running += delta
                return self._job_seconds

        def _job_started(self, grant):
            grant.started = True
            self._account(+1)

        def sample_share(self):
            """Own CPU per job-second since the last call (called by the waiting thread)."""
            if not level:
                return
            job_seconds = self._account(0)
            own = self._read_own()
            if self._share_base is not None:
                d_own, d_js = own - self._share_base[0], job_seconds - self._share_base[1]
                if d_js < 0.1:
                    return  # too little to judge (and 10 ms ticks): keep accumulating
                sample = d_own / d_js
                self.share = sample if self.share is None else 0.5 * self.share + 0.5 * sample
                if self.share < (1 - tolerance) * self.required:
                    self.level = max(1, min(self.level, self.running) - 1)
            self._share_base = (own, job_seconds)

        def starved(self):
            return self.share is not None and self.share < (1 - tolerance) * self.required

        def _begin(self, now, interval):
            return _Readings(self, now, interval)

        def _grant(self):
            return _Grant(self, self.required)

        def _release(self, grant):
            self._event()
            if getattr(grant, "started", False) and grant in self._grants:
                grant.started = False
                self._account(-1)
            super()._release(grant)

        def _resource_admits(self, readings, reserved, needed):
            if level and len(self._grants) < self.level and not self.starved():
                return True  # refill a slot the readings vouched for
            if not readings.samples or readings.fresh:
                return False
            if readings.stale():
                readings.next_sample_at = self._clock()  # rebase at once
                return False
            used = readings.used.value + reserved
            if used < self.cpu_promised:
                return True
            if readings.idle.value - reserved < needed * (1 - tolerance):
                return False
            if used > self.quota - self.required:
                return False
            self.level = max(self.level, len(self._grants) + 1)
            return True

    return RestartGate(required, **kwargs)


def _own_cpu_seconds():
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _traced(gate):
    """``POTHEAD_BENCH_GATE_TRACE=path``: log every reading and grant of the gate (investigation)."""
    path = os.environ.get("POTHEAD_BENCH_GATE_TRACE")
    if not path or not hasattr(gate, "_begin"):
        return gate
    out = open(path, "a", buffering=1)
    begin, call = gate._begin, gate.wait_for_slot

    def traced_begin(now, interval):
        readings = begin(now, interval)
        sample = readings.sample

        def traced_sample(at):
            sample(at)
            out.write(json.dumps({"t": time.time(), "ev": "sample", "idle": readings.idle.value,
                                  "used": readings.used.value, "granted": len(gate._grants),
                                  "reserved": gate._reserved_locked()[0], "interval": interval}) + "\n")

        readings.sample = traced_sample
        out.write(json.dumps({"t": time.time(), "ev": "begin", "interval": interval,
                              "granted": len(gate._grants)}) + "\n")
        return readings

    def traced_call(halt):
        grant = call(halt)
        out.write(json.dumps({"t": time.time(), "ev": "grant", "granted": len(gate._grants)}) + "\n")
        done = grant.done

        def traced_done():
            done()
            out.write(json.dumps({"t": time.time(), "ev": "done", "granted": len(gate._grants)}) + "\n")

        grant.done = traced_done
        return grant

    gate._begin = traced_begin
    return traced_call


def gated_app(environ, start_response):
    return _job(environ, start_response, _GATE)


_GATE = _gate_from_env()
gated_app.wait_for_slot = _traced(_GATE)  # type: ignore[attr-defined]
