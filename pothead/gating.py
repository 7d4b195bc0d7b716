"""
Gates: when may a ``--poll-jobs`` worker take one more job?

The worker calls ``app.wait_for_slot(halt)`` in a thread before it opens each
new connection to the hub.  The call blocks until a job may start and returns
a :class:`Grant`; the worker calls ``grant.request_received(environ)`` when a
request arrives on that connection and ``grant.done()`` when the job ends (or
the connection failed without a job).  ``halt()`` turns true when the worker
is stopping; ``wait_for_slot`` then returns within ``halt_check_interval``
with a *halted* grant (``grant.halted``), which counts for nothing.

Ready-made gates, each a callable ``wait_for_slot``::

    app.wait_for_slot = wait_for_idle_cpus(2)                # as in POTHEAD 0.10
    app.wait_for_slot = wait_for_free_memory("1.5G")
    app.wait_for_slot = wait_for_resources(cpus=2, memory="1.5G")
    app.wait_for_slot = all_of(CpuGate(2), MemoryGate("1G"), max_concurrent=8)

Every gate lets at least one job run: while it holds no grant it grants at
once.  Further grants depend on the gate's readings.  Readings are taken by
the waiting thread, outside the gate's lock; decisions and grant bookkeeping
happen under the gate's lock, so ``done()`` and ``request_received()`` may
come from any (WSGI) thread.  A ``done()``, a job start or a reservation
reset wakes a waiter at once instead of at its next poll, so a worker whose
jobs run one at a time takes the next job without a polling delay.  The CPU
gate keeps its readings across waits, re-reads them at once after every job
start and end, and refills a concurrency its readings already admitted as
soon as a job ends (see :class:`CpuGate`).

Combining gates (:class:`AllOf`) never *holds* one gate's grant while waiting
for another: each step of the wait takes every member's lock (always in the
same global order, so two combinations sharing gates cannot deadlock), asks
every member whether it would admit a job now, and only if all say yes takes
a grant from each, still under those locks.  Otherwise nothing is taken and
the combination waits for fresh readings or a release.  The alternative --
acquire from each gate in turn -- either holds a CPU slot hostage while the
memory gate blocks, or has to give grants back and retry, which starves.

Everything that touches the machine (clock, sleep, CPU and memory readers) is
injected, so the gate maths is unit-tested without sleeping or real load; the
real readers live in :class:`SystemResources`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import psutil

from .cgroups import CgroupFS
from .config import parse_size

__all__ = [
    "AllOf",
    "CombinedGrant",
    "CpuGate",
    "Gate",
    "Grant",
    "Halt",
    "MemoryGate",
    "ReservationGrant",
    "ReservingGate",
    "SystemResources",
    "WaitForSlot",
    "all_of",
    "wait_for_free_memory",
    "wait_for_idle_cpus",
    "wait_for_resources",
]

#: ``halt()``: true once the worker is stopping.
Halt = Callable[[], bool]
#: ``wait_for_slot(halt) -> grant``, the contract the worker calls.
WaitForSlot = Callable[[Halt], "Grant"]
Environ = MutableMapping[str, Any]

# Readings are taken every (mean wait for a slot / POLL_DIVISOR) seconds,
# clamped: faster than 50 ms, CPU idle readings are mostly noise; slower than
# 2 s, a freed machine sits idle too long.
POLL_DIVISOR = 20
POLL_MIN_INTERVAL = 0.050
POLL_MAX_INTERVAL = 2.0
# A waiter looks at halt() at least this often, however long its poll interval.
HALT_CHECK_INTERVAL = 0.1
# Without an explicit max_concurrent, the CPU gate never runs more than
# ceil(DEFAULT_CPU_OVERCOMMIT * cpus / required) jobs: an upper bound in case
# jobs block on I/O and leave the CPU idle.
DEFAULT_CPU_OVERCOMMIT = 2
CPU_PROMISED_ENV = "POTHEAD_CPU_PROMISED"
# The CPU gate admits when idle CPUs cover (1 - CPU_TOLERANCE) of what a job
# needs: /proc/stat counts in 10 ms ticks and the worker uses a little CPU
# itself, so one free core reads as 0.95-0.99 idle CPUs, never quite 1.
CPU_TOLERANCE = 0.1
# Our CPU time per job-second is judged over at least this many job-seconds
# (so 10 ms ticks are a few % of it) and smoothed with this inertia.
SHARE_MIN_JOB_SECONDS = 0.2
SHARE_INERTIA = 0.5
# How often SystemResources re-checks whether our cgroup holds only us, and
# re-lists our child processes (for our own CPU time), in seconds.
OWN_CGROUP_RECHECK = 30.0
CHILDREN_RELIST = 1.0


class Smoothed:
    """An exponential moving average: ``value <- inertia * value + (1 - inertia) * sample``."""

    def __init__(self, initial: float, inertia: float) -> None:
        if not 0 <= inertia < 1:
            raise ValueError(f"inertia must be in [0, 1), not {inertia!r}")
        self.value = initial
        self.inertia = inertia

    def update(self, sample: float) -> float:
        self.value = self.inertia * self.value + (1 - self.inertia) * sample
        return self.value


class SmoothedRate:
    """
    The smoothed rate of change of a cumulative counter (CPU-seconds -> CPUs).

    Each :meth:`update` divides the counter's increase by the time since the
    previous reading.  A reading taken no time after the previous one, or a
    counter that went backwards (a recreated cgroup), only moves the baseline.
    """

    def __init__(self, counter: float, now: float, initial: float, inertia: float) -> None:
        self._last_counter = counter
        self._last_time = now
        self.smoothed = Smoothed(initial, inertia)

    @property
    def value(self) -> float:
        return self.smoothed.value

    def update(self, counter: float, now: float) -> float:
        elapsed = now - self._last_time
        delta = counter - self._last_counter
        self._last_counter, self._last_time = counter, now
        if elapsed > 0 and delta >= 0:
            self.smoothed.update(delta / elapsed)
        return self.smoothed.value


class _Wakeup:
    """
    Lets a waiting thread sleep until a timeout or until something changed.

    ``generation`` counts changes; a waiter notes it before deciding and
    passes it to :meth:`wait`, which returns at once if a change came in
    between -- so a release is never missed, and no gate lock is held while
    sleeping.  With an injected ``sleep`` (tests), waits are that function.
    """

    def __init__(self, sleep: Callable[[float], object] | None) -> None:
        self._sleep = sleep
        self._condition = threading.Condition(threading.Lock())
        self.generation = 0

    def notify(self) -> None:
        with self._condition:
            self.generation += 1
            self._condition.notify_all()

    def wait(self, seconds: float, seen: int) -> None:
        if self.generation != seen:
            return
        if self._sleep is not None:
            self._sleep(seconds)
            return
        with self._condition:
            if self.generation == seen:
                self._condition.wait(seconds)


@contextmanager
def _holding(locks: Sequence[threading.Lock]) -> Iterator[None]:
    """Acquire ``locks`` (already in global order) and release them in reverse."""
    taken: list[threading.Lock] = []
    try:
        for lock in locks:
            lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


class Readings(ABC):
    """What one ``wait_for_slot`` call sees of one gate's measurements.

    Created per wait and sampled by the waiting thread, read by the gate's
    decision under its lock.  ``next_sample_at`` is when fresh readings are
    due.  A memory gate's readings belong to the wait; a CPU gate's are a
    view of measurements the gate keeps across waits (:class:`_CpuSeries`).
    """

    @property
    @abstractmethod
    def next_sample_at(self) -> float:
        """When fresh readings are due (the gate's clock)."""

    @abstractmethod
    def sample(self, now: float) -> None:
        """Take fresh readings (called by the waiting thread when due)."""


class Grant:
    """
    Permission for one job, from one gate.

    ``done()`` gives it back; it is idempotent and safe from any thread.
    ``request_received(environ)`` is called when the job's request arrives.
    A grant whose ``gate`` is ``None`` is *halted*: ``wait_for_slot`` returned
    because the worker is stopping, and the grant counts for nothing.
    """

    def __init__(self, gate: Gate | None) -> None:
        self.gate = gate

    def __repr__(self) -> str:
        return f"<{type(self).__name__} from {self.gate!r}>"

    @property
    def halted(self) -> bool:
        return self.gate is None

    def request_received(self, environ: Environ) -> None:
        """The job's request has arrived (the base grant has nothing to do)."""

    def done(self) -> None:
        """The job is over, or the connection failed without a job."""
        if self.gate is not None:
            self.gate._release(self)


class Gate(ABC):
    """
    Decides when a worker may take one more job; callable as ``wait_for_slot``.

    Invariants, kept under ``self._lock``:

    * ``granted`` is the number of grants handed out and not yet ``done()``;
    * it never exceeds ``max_concurrent`` (``None``: no cap of the gate's own);
    * a leaf gate (not :class:`AllOf`) holding no grant admits at once.

    Subclasses provide the readings (:meth:`_begin`) and the decision
    (:meth:`_admits`, called with the lock held; it must not block or do I/O).
    """

    def __init__(
        self,
        *,
        max_concurrent: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        poll_interval: tuple[float, float] = (POLL_MIN_INTERVAL, POLL_MAX_INTERVAL),
        halt_check_interval: float = HALT_CHECK_INTERVAL,
    ) -> None:
        if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
            raise ValueError(f"max_concurrent must be a positive integer, not {max_concurrent!r}")
        low, high = poll_interval
        if not 0 < low <= high:
            raise ValueError(f"poll_interval must be (min, max) with 0 < min <= max, not {poll_interval!r}")
        if halt_check_interval <= 0:
            raise ValueError(f"halt_check_interval must be positive, not {halt_check_interval!r}")
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._poll_interval = poll_interval
        self._halt_check_interval = halt_check_interval
        self._lock = threading.Lock()
        self._grants: set[Grant] = set()
        self._wakeup = _Wakeup(sleep)
        # Woken when this gate releases capacity: our own waiters, and those
        # of every combination this gate is part of.
        self._watchers: list[_Wakeup] = [self._wakeup]
        self._mean_wait = Smoothed(1.0, 0.7)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} granted={len(self._grants)}>"

    # -- public -----------------------------------------------------------------

    @property
    def granted(self) -> int:
        """Grants handed out and not yet done (for metrics)."""
        with self._lock:
            return len(self._grants)

    def wait_for_slot(self, halt: Halt) -> Grant:
        """Block until a job may start (or ``halt()``); return its grant."""
        started = self._clock()
        readings = self._begin(started, self.poll_interval())
        locks = self._locks()
        while True:
            if halt():
                return Grant(None)
            # Noted before deciding: a release after this point cuts the wait short.
            seen = self._wakeup.generation
            with _holding(locks):
                if self._admits(readings):
                    grant = self._grant()
                    self._grants.add(grant)
                    break
            now = self._clock()
            if now >= readings.next_sample_at:
                readings.sample(now)
                continue
            self._wakeup.wait(min(readings.next_sample_at - now, self._halt_check_interval), seen)
        waited = self._clock() - started
        with self._lock:
            self._mean_wait.update(waited)
        return grant

    __call__ = wait_for_slot

    def poll_interval(self) -> float:
        """Seconds between readings: a fraction of the typical wait, clamped."""
        low, high = self._poll_interval
        with self._lock:
            mean = self._mean_wait.value
        return max(low, min(mean / POLL_DIVISOR, high))

    # -- for subclasses and AllOf ---------------------------------------------------

    @abstractmethod
    def _begin(self, now: float, interval: float) -> Readings:
        """The readings one wait decides on, sampled every ``interval`` seconds."""

    @abstractmethod
    def _admits(self, readings: Readings) -> bool:
        """Whether one more job may start now (lock held)."""

    def _grant(self) -> Grant:
        """A new grant (lock held; the caller records it)."""
        return Grant(self)

    def _locks(self) -> list[threading.Lock]:
        """Every lock a decision needs, in global order."""
        return [self._lock]

    def _gates(self) -> list[Gate]:
        """This gate and every gate inside it."""
        return [self]

    def _under_cap(self) -> bool:
        return self.max_concurrent is None or len(self._grants) < self.max_concurrent

    def _release(self, grant: Grant) -> None:
        with self._lock:
            if grant not in self._grants:
                return
            self._grants.discard(grant)
        self._changed()

    def _changed(self) -> None:
        """Capacity was freed: wake every waiter that may now admit (no lock held)."""
        for watcher in self._watchers:
            watcher.notify()


# -- reservations -----------------------------------------------------------------


class ReservationGrant(Grant):
    """
    A grant that reserves some amount of a resource until its job has started.

    A job granted but not yet running uses nothing the readings can see, so
    its amount is reserved: added to measured use and subtracted from what is
    free.  When the request arrives the reservation drops to 0 (the job's own
    use shows in the readings from then on) unless the gate keeps
    reservations; the job may set it at any time through the callable the
    grant puts in the WSGI environ (``RESET_CPU_RESERVATION`` for CPUs).
    """

    gate: ReservingGate

    def __init__(self, gate: ReservingGate, amount: float) -> None:
        super().__init__(gate)
        self.reservation = amount

    def request_received(self, environ: Environ) -> None:
        environ[self.gate.environ_key] = self.reset_reservation
        if not self.gate.keep_reservation:
            self.reset_reservation(0)

    def reset_reservation(self, amount: float | str = 0) -> None:
        """Set what is still reserved for this job (0: its use is in the readings now)."""
        self.gate._reset(self, self.gate._amount(amount, "reservation"))


class ReservingGate(Gate):
    """
    A leaf gate for one measured resource, with reservations.

    Each granted-not-started job reserves ``required``; each further
    reservation makes the next job need ``reservation_uncertainty`` times more
    headroom, since the jobs already reserved are guesses.
    """

    environ_key = "RESET_RESERVATION"

    def __init__(
        self,
        required: float,
        *,
        max_concurrent: int | None,
        reservation_uncertainty: float,
        keep_reservation: bool,
        **timing: Any,
    ) -> None:
        super().__init__(max_concurrent=max_concurrent, **timing)
        if not (isinstance(required, (int, float)) and math.isfinite(required) and required >= 0):
            raise ValueError(f"required must be a finite number >= 0, not {required!r}")
        if not reservation_uncertainty >= 1:
            raise ValueError(f"reservation_uncertainty must be >= 1, not {reservation_uncertainty!r}")
        self.required = float(required)
        self.reservation_uncertainty = reservation_uncertainty
        self.keep_reservation = keep_reservation

    def _amount(self, value: float | str, what: str) -> float:
        amount = float(value)
        if not amount >= 0:
            raise ValueError(f"{what} must be >= 0, not {value!r}")
        return amount

    @property
    def reserved(self) -> float:
        """Total amount reserved for granted-not-started jobs (for metrics)."""
        with self._lock:
            return self._reserved_locked()[0]

    @property
    def reservations(self) -> int:
        """Number of grants holding a reservation (for metrics)."""
        with self._lock:
            return self._reserved_locked()[1]

    def _reserved_locked(self) -> tuple[float, int]:
        amounts = [g.reservation for g in self._grants if isinstance(g, ReservationGrant) and g.reservation > 0]
        return sum(amounts), len(amounts)

    def _needed_locked(self) -> tuple[float, float]:
        """(reserved, headroom the next job needs) -- lock held."""
        reserved, count = self._reserved_locked()
        return reserved, self.required * self.reservation_uncertainty**count

    def _admits(self, readings: Readings) -> bool:
        if not self._grants:
            return True  # at least one job always runs
        if not self._under_cap():
            return False
        reserved, needed = self._needed_locked()
        return self._resource_admits(readings, reserved, needed)

    @abstractmethod
    def _resource_admits(self, readings: Readings, reserved: float, needed: float) -> bool:
        """Whether the readings leave ``needed`` free beyond ``reserved`` (lock held)."""

    def _grant(self) -> Grant:
        return ReservationGrant(self, self.required)

    def _reset(self, grant: ReservationGrant, amount: float) -> None:
        with self._lock:
            if grant not in self._grants:
                return  # done already: nothing is reserved for it
            freed = amount < grant.reservation
            grant.reservation = amount
        if freed:
            self._changed()


# -- CPU ----------------------------------------------------------------------------


class _CpuSeries:
    """
    The CPU gate's readings, kept across waits (every wait of the gate shares them).

    Smoothed idle CPUs of the machine and CPUs used by us, each the rate of a
    cumulative counter since ``base``.  A job starting or ending changes CPU
    use in a step, and a rate measured across the step describes neither
    side; so such an *event* (the gate counts them) makes the series stale:
    the next sample only takes a new baseline, at once, and the one after it
    *replaces* the smoothed values with its rates instead of blending them in
    (``current`` is false in between, and the gate does not decide on
    readings then).  Smoothing (``inertia``) resumes from there.
    """

    def __init__(self, inertia: float) -> None:
        self.idle = Smoothed(0.0, inertia)
        self.used = Smoothed(0.0, inertia)
        #: (time, idle counter, used counter) the next rates are measured from.
        self.base: tuple[float, float, float] | None = None
        #: The gate's event count when ``base`` was taken.
        self.based_on = -1
        #: A rate was measured since ``base`` was (re)taken after an event.
        self.current = False
        self.next_sample_at = -math.inf


class _CpuReadings(Readings):
    """One wait's view of the gate's :class:`_CpuSeries`: samples it every ``interval`` seconds."""

    def __init__(self, gate: CpuGate, interval: float) -> None:
        self._gate = gate
        self._interval = interval

    @property
    def next_sample_at(self) -> float:
        return self._gate._series.next_sample_at

    def sample(self, now: float) -> None:
        self._gate._sample(now, self._interval)


class _CpuGrant(ReservationGrant):
    """A CPU gate's grant: the job's start and end are events for the gate's readings."""

    gate: CpuGate

    def request_received(self, environ: Environ) -> None:
        # Before the reservation goes: from here on the job's use must show in
        # readings taken after its start, not in the ones taken before.
        self.gate._job_started(self)
        super().request_received(environ)


class CpuGate(ReservingGate):
    """
    Admits further jobs while ``required`` CPUs look idle (POTHEAD 0.10's contract).

    With at least one grant live and fewer than ``max_concurrent`` (default
    ``ceil(2 * cpus / required)``, cpus being the quota or the CPUs we may
    run on, whichever is smaller), another job starts when

    * the gate *refills* a level the readings already vouched for (below), or
    * on current readings, with the reservations of granted-not-started jobs
      added to the use:

      - our own CPU use is below ``cpu_promised`` (``POTHEAD_CPU_PROMISED``:
        capacity promised to us, e.g. a Kubernetes request that neighbours
        borrow while we are quiet), or
      - idle CPUs minus reservations cover
        ``required * uncertainty**reservations * (1 - tolerance)`` and our
        use leaves room for ``required`` under the cgroup quota.

    *Tolerance* (default 0.1): /proc/stat counts CPU time in 10 ms ticks and
    the worker itself uses a little CPU, so a machine with exactly one free
    CPU reads as 0.95-0.99 idle; without it, ``required=1`` on a machine with
    one core to spare would never admit the job that uses it.

    *Readings* (:class:`_CpuSeries`) are smoothed with ``inertia`` and kept
    across waits.  A job starting (``request_received``, before its
    reservation drops), a job ending (``done``) or a reservation shrinking
    marks them stale: the next sample re-reads at once as a new baseline and
    the one after it replaces the smoothed value, so a decision never rests
    on readings from before the latest change.

    *Level*: the number of concurrent jobs the readings admitted (the most
    grants live right after an admission on readings).  When jobs end and
    fewer than ``level`` grants are live, the gate refills at once, without
    waiting for new readings: with the machine busy with our own jobs the
    readings cannot show that the job just ended freed its CPUs, but that
    level has been shown to fit.  Unless our jobs are *starved*: the gate
    measures its own CPU time (``read_own``) per second of running jobs
    (``cpu_share``, smoothed); while that is below
    ``(1 - tolerance) * required`` -- other load arrived, or the jobs wait on
    I/O -- it does not refill and lowers the level to one below the number
    of jobs running (at least 1).  Only readings raise it again.

    Readers: ``read_idle()`` -> cumulative idle CPU-seconds of the machine,
    ``read_used()`` -> cumulative CPU-seconds used by our cgroup,
    ``read_own()`` -> cumulative CPU-seconds used by this worker (its cgroup
    when the cgroup holds nothing else, else the process and its children).
    ``None`` means the real ones (:class:`SystemResources`).
    """

    environ_key = "RESET_CPU_RESERVATION"

    def __init__(
        self,
        required: float,
        *,
        max_concurrent: int | None = None,
        inertia: float = 0.7,
        tolerance: float = CPU_TOLERANCE,
        reservation_uncertainty: float = 1.3,
        keep_cpu_reservation: bool = False,
        cpu_promised: float | None = None,
        read_idle: Callable[[], float] | None = None,
        read_used: Callable[[], float] | None = None,
        read_own: Callable[[], float] | None = None,
        cpu_count: float | None = None,
        quota: float | None = None,
        system: SystemResources | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        poll_interval: tuple[float, float] = (POLL_MIN_INTERVAL, POLL_MAX_INTERVAL),
        halt_check_interval: float = HALT_CHECK_INTERVAL,
    ) -> None:
        machine = _Lazy(system)
        if read_idle is None:
            read_idle = machine().idle_cpu_seconds
        if read_used is None:
            read_used = machine().used_cpu_seconds
        if read_own is None:
            read_own = machine().own_cpu_seconds
        if cpu_count is None:
            cpu_count = machine().cpu_count()
        if quota is None:
            quota = machine().cpu_quota()
        if cpu_promised is None:
            cpu_promised = _cpu_promised_from_env()
        if not 0 <= inertia < 1:
            raise ValueError(f"inertia must be in [0, 1), not {inertia!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), not {tolerance!r}")
        capacity = min(quota, cpu_count)
        if max_concurrent is None:
            max_concurrent = _default_max_concurrent(DEFAULT_CPU_OVERCOMMIT * capacity, required, "CPUs")
        super().__init__(
            required,
            max_concurrent=max_concurrent,
            reservation_uncertainty=reservation_uncertainty,
            keep_reservation=keep_cpu_reservation,
            clock=clock,
            sleep=sleep,
            poll_interval=poll_interval,
            halt_check_interval=halt_check_interval,
        )
        self.inertia = inertia
        self.tolerance = tolerance
        self.cpu_promised = cpu_promised
        self.cpu_count = cpu_count
        self.quota = quota
        self._read_idle = read_idle
        self._read_used = read_used
        self._read_own = read_own
        #: Latest smoothed readings (for metrics); None before the first.
        self.idle_cpus: float | None = None
        self.used_cpus: float | None = None
        #: Concurrent jobs the readings have admitted (refilled at once while not starved).
        self.level = 0
        #: Our CPU-seconds per second of running jobs, smoothed; None before the first measurement.
        self.cpu_share: float | None = None
        # Sampling (I/O) is serialized by its own lock, never under self._lock;
        # results are applied and decisions read them under self._lock.
        self._sample_lock = threading.Lock()
        self._series = _CpuSeries(inertia)
        self._events = 0  # jobs started or ended, reservations shrunk: readings before are stale
        self._vouched = False  # the latest _resource_admits admitted on readings
        self._running: set[Grant] = set()  # grants whose request has arrived
        self._job_seconds = 0.0  # integral of len(self._running) over time
        self._job_seconds_at = clock()
        self._share_base: tuple[float, float] | None = None  # (own CPU-seconds, job-seconds)

    def __repr__(self) -> str:
        return (
            f"<CpuGate required={self.required:g} granted={len(self._grants)}/{self.max_concurrent} "
            f"level={self.level}>"
        )

    @property
    def keep_cpu_reservation(self) -> bool:
        return self.keep_reservation

    @property
    def reserved_cpus(self) -> float:
        """CPUs reserved for granted-not-started jobs (for metrics)."""
        return self.reserved

    @property
    def running(self) -> int:
        """Granted jobs whose request has arrived and that are not done (for metrics)."""
        with self._lock:
            return len(self._running)

    # -- events (any thread) ------------------------------------------------------

    def _stale_locked(self) -> None:
        """Readings taken so far predate a change in CPU use: re-read at once (lock held)."""
        self._events += 1
        self._series.next_sample_at = -math.inf

    def _count_job_seconds_locked(self) -> float:
        now = self._clock()
        self._job_seconds += len(self._running) * max(0.0, now - self._job_seconds_at)
        self._job_seconds_at = now
        return self._job_seconds

    def _job_started(self, grant: Grant) -> None:
        with self._lock:
            if grant not in self._grants or grant in self._running:
                return
            self._stale_locked()
            self._count_job_seconds_locked()
            self._running.add(grant)
        self._changed()

    def _release(self, grant: Grant) -> None:
        with self._lock:
            if grant not in self._grants:
                return
            self._stale_locked()
            if grant in self._running:
                self._count_job_seconds_locked()
                self._running.discard(grant)
            self._grants.discard(grant)
        self._changed()

    def _reset(self, grant: ReservationGrant, amount: float) -> None:
        with self._lock:
            if grant in self._grants and amount < grant.reservation:
                self._stale_locked()  # the job's use must show in readings from now on
        super()._reset(grant, amount)

    def _admits(self, readings: Readings) -> bool:
        self._vouched = False
        return super()._admits(readings)

    def _grant(self) -> Grant:
        if self._vouched:
            self.level = max(self.level, len(self._grants) + 1)
            self._vouched = False
        return _CpuGrant(self, self.required)

    # -- readings (the waiting thread) ------------------------------------------------

    def _begin(self, now: float, interval: float) -> Readings:
        return _CpuReadings(self, interval)

    def _sample(self, now: float, interval: float) -> None:
        with self._sample_lock:
            series = self._series
            if now < series.next_sample_at:
                return  # another waiter sampled meanwhile
            events = self._events  # before reading: an event during the reads makes them stale
            idle, used = float(self._read_idle()), float(self._read_used())
            own = float(self._read_own())
            with self._lock:
                base = series.base
                if base is None or series.based_on != events:
                    # Stale (or the first reading): a new baseline, and the next rate replaces.
                    series.current = False
                    series.base, series.based_on = (now, idle, used), events
                elif now > base[0] and idle >= base[1] and used >= base[2]:
                    elapsed = now - base[0]
                    idle_rate, used_rate = (idle - base[1]) / elapsed, (used - base[2]) / elapsed
                    if series.current:
                        series.idle.update(idle_rate)
                        series.used.update(used_rate)
                    else:
                        series.idle.value, series.used.value = idle_rate, used_rate
                        series.current = True
                    series.base = (now, idle, used)
                    self.idle_cpus, self.used_cpus = series.idle.value, series.used.value
                else:
                    series.base = (now, idle, used)  # no time passed, or a counter restarted
                stale = series.based_on != self._events  # an event came in during the reads
                series.next_sample_at = now if stale else now + interval
                self._measure_share_locked(own)

    def _measure_share_locked(self, own: float) -> None:
        """Our CPU-seconds per job-second since the last measurement; lower the level when starved."""
        job_seconds = self._count_job_seconds_locked()
        base = self._share_base
        if base is None or own < base[0]:
            self._share_base = (own, job_seconds)
            return
        jobs = job_seconds - base[1]
        if jobs < SHARE_MIN_JOB_SECONDS:
            return  # too little to judge yet (and counters tick in 10 ms): keep accumulating
        share = (own - base[0]) / jobs
        self._share_base = (own, job_seconds)
        if self.cpu_share is not None:
            share = SHARE_INERTIA * self.cpu_share + (1 - SHARE_INERTIA) * share
        self.cpu_share = share
        if self._starved_locked():
            self.level = max(1, min(self.level, len(self._running)) - 1)

    def _starved_locked(self) -> bool:
        return self.cpu_share is not None and self.cpu_share < (1 - self.tolerance) * self.required

    # -- the decision (lock held) --------------------------------------------------------

    def _resource_admits(self, readings: Readings, reserved: float, needed: float) -> bool:
        assert isinstance(readings, _CpuReadings)
        if len(self._grants) < self.level and not self._starved_locked():
            return True  # refill a level the readings vouched for
        series = self._series
        if not series.current or series.based_on != self._events:
            return False  # no reading since the latest job started or ended
        used = series.used.value + reserved
        if used < self.cpu_promised:
            self._vouched = True
            return True
        if series.idle.value - reserved < needed * (1 - self.tolerance):
            return False
        if used > self.quota - self.required:
            return False
        self._vouched = True
        return True


# -- memory ---------------------------------------------------------------------------


class _MemoryReadings(Readings):
    """The latest available-memory reading of one wait.

    Memory is a level, not a rate: a reading is meaningful at once, so the
    first is taken when the wait begins and none is smoothed.
    """

    def __init__(self, gate: MemoryGate, now: float, interval: float) -> None:
        self._gate = gate
        self._interval = interval
        self.available = 0.0
        self._next_sample_at = now
        self.sample(now)

    @property
    def next_sample_at(self) -> float:
        return self._next_sample_at

    def sample(self, now: float) -> None:
        self.available = float(self._gate._read_available())
        self._next_sample_at = now + self._interval
        self._gate.available_bytes = self.available


class MemoryGate(ReservingGate):
    """
    Admits further jobs while ``required`` bytes of memory are free.

    With at least one grant live, another job starts only when the available
    memory (host ``MemAvailable`` and the headroom under every cgroup memory
    limit on our chain, whichever is less) minus reservations covers
    ``required * uncertainty**reservations``, and fewer than
    ``max_concurrent`` grants are live (default: as many jobs as fit in the
    memory limit or total RAM).

    Memory grows while a job runs, unlike CPU use, which shows at once: a job
    that allocates slowly should be gated with ``keep_memory_reservation=True``
    and call ``environ["RESET_MEMORY_RESERVATION"](0)`` once it has allocated
    (amounts are bytes or size strings like ``"200M"``).

    ``read_available()`` -> bytes available now; ``total`` -> bytes we could
    ever use.  ``None`` means the real ones (:class:`SystemResources`).
    """

    environ_key = "RESET_MEMORY_RESERVATION"

    def __init__(
        self,
        required: int | float | str,
        *,
        max_concurrent: int | None = None,
        reservation_uncertainty: float = 1.3,
        keep_memory_reservation: bool = False,
        read_available: Callable[[], float] | None = None,
        total: float | None = None,
        system: SystemResources | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        poll_interval: tuple[float, float] = (POLL_MIN_INTERVAL, POLL_MAX_INTERVAL),
        halt_check_interval: float = HALT_CHECK_INTERVAL,
    ) -> None:
        required_bytes = _bytes(required, "memory")
        machine = _Lazy(system)
        if read_available is None:
            read_available = machine().available_memory
        if total is None:
            total = machine().total_memory()
        if max_concurrent is None:
            if required_bytes == 0:
                raise ValueError("memory required is 0: give max_concurrent to bound concurrency")
            max_concurrent = max(1, math.floor(total / required_bytes)) if math.isfinite(total) else None
        super().__init__(
            required_bytes,
            max_concurrent=max_concurrent,
            reservation_uncertainty=reservation_uncertainty,
            keep_reservation=keep_memory_reservation,
            clock=clock,
            sleep=sleep,
            poll_interval=poll_interval,
            halt_check_interval=halt_check_interval,
        )
        self.total = total
        self._read_available = read_available
        #: Latest available-memory reading (for metrics); None before the first.
        self.available_bytes: float | None = None

    def __repr__(self) -> str:
        return f"<MemoryGate required={self.required:.0f}B granted={len(self._grants)}/{self.max_concurrent}>"

    def _amount(self, value: float | str, what: str) -> float:
        return float(_bytes(value, what))

    @property
    def reserved_bytes(self) -> float:
        """Bytes reserved for granted-not-started jobs (for metrics)."""
        return self.reserved

    def _begin(self, now: float, interval: float) -> Readings:
        return _MemoryReadings(self, now, interval)

    def _resource_admits(self, readings: Readings, reserved: float, needed: float) -> bool:
        assert isinstance(readings, _MemoryReadings)
        return readings.available - reserved >= needed


# -- combinations --------------------------------------------------------------------


class _AllReadings(Readings):
    """Every member's readings; each member is sampled on its own schedule."""

    def __init__(self, parts: list[Readings]) -> None:
        self.parts = parts

    @property
    def next_sample_at(self) -> float:
        # Asked afresh each time: a member's readings may turn stale (due at once) any time.
        return min(p.next_sample_at for p in self.parts)

    def sample(self, now: float) -> None:
        for part in self.parts:
            if now >= part.next_sample_at:
                part.sample(now)


class CombinedGrant(Grant):
    """One grant per member gate, handed out together; callbacks fan out to all."""

    def __init__(self, gate: AllOf, parts: list[Grant]) -> None:
        super().__init__(gate)
        self.parts = parts

    def request_received(self, environ: Environ) -> None:
        for part in self.parts:
            part.request_received(environ)

    def done(self) -> None:
        for part in self.parts:
            part.done()
        super().done()


class AllOf(Gate):
    """
    A job may start only when every member gate admits it.

    Member gates are not waited on in turn: each step locks every member (in
    one global order), asks each whether it admits a job with its current
    readings, and takes a grant from all of them only if all agree -- so no
    member's grant is ever held while another refuses, and two combinations
    sharing gates cannot deadlock.  Each member keeps its own rules, first
    slot included; ``max_concurrent`` caps the combination as a whole.
    Members may be used on their own or in other combinations at the same
    time: their counts and reservations are shared.  The combination's clock,
    sleep and polling come from its first member unless given.
    """

    def __init__(
        self,
        *gates: Gate,
        max_concurrent: int | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], object] | None = None,
        poll_interval: tuple[float, float] | None = None,
        halt_check_interval: float | None = None,
    ) -> None:
        if not gates:
            raise ValueError("all_of needs at least one gate")
        for gate in gates:
            if not isinstance(gate, Gate):
                raise TypeError(
                    f"all_of combines pothead.gating.Gate objects, not {gate!r}: a plain wait_for_slot "
                    "function cannot be asked 'would you admit?' without taking a grant"
                )
        first = gates[0]
        super().__init__(
            max_concurrent=max_concurrent,
            clock=clock or first._clock,
            sleep=sleep if sleep is not None else first._wakeup._sleep,
            poll_interval=poll_interval or first._poll_interval,
            halt_check_interval=halt_check_interval or first._halt_check_interval,
        )
        self.gates = gates
        for member in {id(g): g for gate in gates for g in gate._gates()}.values():
            member._watchers.append(self._wakeup)

    def __repr__(self) -> str:
        return f"<AllOf {list(self.gates)!r} granted={len(self._grants)}>"

    def _gates(self) -> list[Gate]:
        return [self] + [g for gate in self.gates for g in gate._gates()]

    def _locks(self) -> list[threading.Lock]:
        # One global order (by id) for every combination: no two can deadlock.
        unique = {id(gate._lock): gate._lock for gate in self._gates()}
        return [unique[key] for key in sorted(unique)]

    def _begin(self, now: float, interval: float) -> Readings:
        return _AllReadings([gate._begin(now, interval) for gate in self.gates])

    def _admits(self, readings: Readings) -> bool:
        assert isinstance(readings, _AllReadings)
        if not self._under_cap():
            return False
        return all(gate._admits(part) for gate, part in zip(self.gates, readings.parts))

    def _grant(self) -> Grant:
        parts = []
        for gate in self.gates:
            part = gate._grant()
            gate._grants.add(part)
            parts.append(part)
        return CombinedGrant(self, parts)


def all_of(*gates: Gate, max_concurrent: int | None = None) -> AllOf:
    """A gate that admits a job only when every one of ``gates`` does (see :class:`AllOf`)."""
    return AllOf(*gates, max_concurrent=max_concurrent)


# -- the real machine ---------------------------------------------------------------------


class SystemResources:
    """
    The machine as the gates see it: host readings (psutil) bounded by our cgroups.

    * CPUs we may use: our CPU affinity (a cpuset/taskset), else every CPU.
    * Idle CPU-seconds: psutil's idle time, summed over the CPUs we may use
      when that is a strict subset (idle CPUs we cannot run on are no help).
    * CPU-seconds used by us: our cgroup's accounting; on a machine without
      cgroup CPU accounting, the host's busy time.
    * CPU-seconds used by this worker (the CPU gate's starvation check): our
      cgroup's accounting when the cgroup holds only this process and its
      descendants (a systemd service, a container whose main process is the
      worker), else this process, its live descendants and its reaped
      children (psutil).
    * Memory: host ``available`` and the headroom under our cgroup limits.
    """

    def __init__(self, cgroup: CgroupFS | None = None) -> None:
        self.cgroup = cgroup if cgroup is not None else CgroupFS()
        self._allowed = _allowed_cpus()
        online = psutil.cpu_count() or 1
        self._per_cpu = (
            self._allowed is not None
            and len(self._allowed) < online
            and len(psutil.cpu_times(percpu=True)) == online
            and max(self._allowed) < online
        )
        self._cgroup_accounts_cpu = self.cgroup.cpu_usage() is not None
        self._own_lock = threading.Lock()
        self._cgroup_is_ours = False
        self._cgroup_checked_at = -math.inf
        self._process_tree = _ProcessTreeCpu()

    def __repr__(self) -> str:
        return f"<SystemResources cpus={self.cpu_count()} {self.cgroup!r}>"

    def cpu_count(self) -> int:
        if self._allowed is not None:
            return len(self._allowed)
        return psutil.cpu_count() or 1

    def cpu_quota(self) -> float:
        return self.cgroup.cpu_quota()

    def idle_cpu_seconds(self) -> float:
        if self._per_cpu and self._allowed is not None:
            times = psutil.cpu_times(percpu=True)
            return float(sum(times[cpu].idle for cpu in self._allowed))
        return float(psutil.cpu_times().idle)

    def used_cpu_seconds(self) -> float:
        if self._cgroup_accounts_cpu:
            used = self.cgroup.cpu_usage()
            if used is not None:
                return used
        times = psutil.cpu_times()
        # guest time is already part of user time; idle and iowait are not use.
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        return float(total - times.idle - getattr(times, "iowait", 0.0))

    def own_cpu_seconds(self) -> float:
        with self._own_lock:
            now = time.monotonic()
            if self._cgroup_accounts_cpu and now - self._cgroup_checked_at >= OWN_CGROUP_RECHECK:
                self._cgroup_is_ours = _cgroup_holds_only_us(self.cgroup)
                self._cgroup_checked_at = now
            if self._cgroup_is_ours:
                used = self.cgroup.cpu_usage()
                if used is not None:
                    return used
            return self._process_tree()

    def available_memory(self) -> float:
        return min(float(psutil.virtual_memory().available), self.cgroup.memory_headroom())

    def total_memory(self) -> float:
        return min(float(psutil.virtual_memory().total), self.cgroup.memory_limit())


class _Lazy:
    """The given :class:`SystemResources`, or one made on first use (it reads /sys and /proc)."""

    def __init__(self, system: SystemResources | None) -> None:
        self._system = system

    def __call__(self) -> SystemResources:
        if self._system is None:
            self._system = SystemResources()
        return self._system


class _ProcessTreeCpu:
    """
    CPU-seconds of this process, its live descendants and the children it reaped.

    Descendants are listed at most every ``CHILDREN_RELIST`` seconds (listing
    scans /proc); a descendant that ends moves its time into its parent's
    reaped-children counters, so the sum stays continuous.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._children: list[psutil.Process] = []
        self._listed_at = -math.inf

    def __call__(self) -> float:
        now = time.monotonic()
        if now - self._listed_at >= CHILDREN_RELIST:
            try:
                self._children = self._me.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._listed_at = now
        total = _process_cpu_seconds(self._me) or 0.0
        for child in self._children:
            total += _process_cpu_seconds(child) or 0.0
        return total


def _process_cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    children = getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
    return float(times.user + times.system + children)


def _cgroup_holds_only_us(cgroup: CgroupFS) -> bool:
    """Whether every process in our CPU-accounting cgroup is this process or a descendant of it."""
    if not cgroup.cpuacct_chain:
        return False
    try:
        pids = [int(word) for word in (cgroup.cpuacct_chain[0] / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return False
    me = os.getpid()
    return all(pid == me or _descends_from(pid, me) for pid in pids)


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.NoSuchProcess:
            return True  # gone: it uses no CPU now
        except psutil.Error:
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _allowed_cpus() -> list[int] | None:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return sorted(getaffinity(0))
    except OSError:
        return None


def _cpu_promised_from_env(environ: MutableMapping[str, str] = os.environ) -> float:
    text = environ.get(CPU_PROMISED_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{CPU_PROMISED_ENV}={text!r} is not a number of CPUs") from None
    if not value >= 0:
        raise ValueError(f"{CPU_PROMISED_ENV}={text!r} must be >= 0")
    return value


def _default_max_concurrent(capacity: float, required: float, unit: str) -> int:
    if required <= 0:
        raise ValueError(f"required {unit} is 0: give max_concurrent to bound concurrency")
    return max(1, math.ceil(capacity / required))


def _bytes(value: int | float | str, what: str) -> int:
    if isinstance(value, str):
        return parse_size(value, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a size; use bytes or a string like '1.5G'")
    return int(value)


# -- the reference-compatible entry points -------------------------------------------------


def wait_for_idle_cpus(
    required: float,
    *,
    max_concurrent: int | None = None,
    inertia: float = 0.7,
    tolerance: float = CPU_TOLERANCE,
    reservation_uncertainty: float = 1.3,
    keep_cpu_reservation: bool = False,
    system: SystemResources | None = None,
) -> CpuGate:
    """
    A ``wait_for_slot`` that starts further jobs while ``required`` CPUs are idle.

    Same contract as POTHEAD 0.10's: at least one job always runs; further
    jobs start while ``required`` CPUs look idle (smoothed with ``inertia``;
    ``(1 - tolerance) * required`` counts as enough, since /proc/stat's 10 ms
    ticks make one free core read as a little less than 1), counting
    ``required`` CPUs as reserved for each job granted but not yet started
    (each further reservation multiplies the requirement by
    ``reservation_uncertainty``); never more than ``max_concurrent`` (default
    ``ceil(2 * cpus / required)``); within the cgroup CPU quota; always while
    our own use is below ``POTHEAD_CPU_PROMISED`` CPUs.

    Unlike 0.10's, the readings are kept across waits (made stale by every
    job start and end), and a concurrency the readings once admitted is
    refilled at once when a job ends -- while our jobs each still get
    ``(1 - tolerance) * required`` CPUs (see :class:`CpuGate`).

    The job's WSGI environ gets ``RESET_CPU_RESERVATION(n)``.  The reservation
    drops to 0 when the request arrives, unless ``keep_cpu_reservation``: for
    jobs that take a while to reach full CPU use, which then call
    ``environ["RESET_CPU_RESERVATION"](0)`` (or a smaller amount) themselves.
    The returned :class:`CpuGate` is callable and exposes ``granted``,
    ``running``, ``reserved_cpus``, ``level`` and ``cpu_share`` for metrics.
    """
    return CpuGate(
        required,
        max_concurrent=max_concurrent,
        inertia=inertia,
        tolerance=tolerance,
        reservation_uncertainty=reservation_uncertainty,
        keep_cpu_reservation=keep_cpu_reservation,
        system=system,
    )


def wait_for_free_memory(
    required: int | float | str,
    *,
    max_concurrent: int | None = None,
    reservation_uncertainty: float = 1.3,
    keep_memory_reservation: bool = False,
    system: SystemResources | None = None,
) -> MemoryGate:
    """A ``wait_for_slot`` that starts further jobs while ``required`` memory is free (see :class:`MemoryGate`)."""
    return MemoryGate(
        required,
        max_concurrent=max_concurrent,
        reservation_uncertainty=reservation_uncertainty,
        keep_memory_reservation=keep_memory_reservation,
        system=system,
    )


def wait_for_resources(
    cpus: float | None = None,
    memory: int | float | str | None = None,
    *,
    max_concurrent: int | None = None,
    inertia: float = 0.7,
    tolerance: float = CPU_TOLERANCE,
    reservation_uncertainty: float = 1.3,
    keep_cpu_reservation: bool = False,
    keep_memory_reservation: bool = False,
    system: SystemResources | None = None,
) -> AllOf:
    """
    A ``wait_for_slot`` that starts further jobs while ``cpus`` CPUs are idle
    *and* ``memory`` is free, e.g. ``wait_for_resources(cpus=2, memory="1.5G")``.

    Each resource keeps the rules of its own gate (:class:`CpuGate`,
    :class:`MemoryGate`); ``max_concurrent``, when given, replaces their
    default caps and caps the combination.  One grant covers both; its environ gets both
    ``RESET_CPU_RESERVATION`` and ``RESET_MEMORY_RESERVATION``.
    """
    if cpus is None and memory is None:
        raise ValueError("wait_for_resources needs cpus, memory, or both")
    system = system or SystemResources()
    gates: list[Gate] = []
    if cpus is not None:
        gates.append(
            CpuGate(
                cpus,
                inertia=inertia,
                tolerance=tolerance,
                reservation_uncertainty=reservation_uncertainty,
                keep_cpu_reservation=keep_cpu_reservation,
                max_concurrent=max_concurrent,
                system=system,
            )
        )
    if memory is not None:
        gates.append(
            MemoryGate(
                memory,
                reservation_uncertainty=reservation_uncertainty,
                keep_memory_reservation=keep_memory_reservation,
                max_concurrent=max_concurrent,
                system=system,
            )
        )
    return AllOf(*gates, max_concurrent=max_concurrent)
