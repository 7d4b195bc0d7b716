"""
The hub's runtime state: the queue, the worker connections, the jobs in flight.

:class:`Hub` is what the consumer side and the worker side share.  It holds no
sockets itself; :mod:`pothead.hub.service` wires it to listeners.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import HubConfig
from .queue import JobQueue

if TYPE_CHECKING:
    from .consumer import ProxyJob
    from .workers import WorkerConnection


class Hub:
    """
    Shared state of one hub.

    ``jobs`` holds every job from arrival to its last byte (queued, dispatched
    or streaming); ``connections`` every open worker connection.  ``totals``
    counts outcomes by name for the status view and logs.
    """

    _log = Logger()

    def __init__(self, config: HubConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.queue: JobQueue[WorkerConnection] = JobQueue(clock.seconds, config.max_queue)
        self.connections: set[WorkerConnection] = set()
        self.jobs: set[ProxyJob] = set()
        self.totals: Counter[str] = Counter()
        #: True once SIGTERM started the drain: new consumer requests get 503.
        self.draining = False
        #: True once the drain is over: finished connections are not reused.
        self.draining_workers = False
        self._idle_waiters: list[Deferred[None]] = []
        #: Hooks for metrics (pothead.metrics) -- called with event names.
        self.observers: list[Callable[[str, dict[str, object]], None]] = []
        # Response bodies watched for a stalled worker (--worker-stall-timeout),
        # all checked by one timer that runs only while there are any.
        self._stall_watches: set[Any] = set()
        self._stall_timer: Any = None

    def emit(self, event: str, **fields: object) -> None:
        self.totals[event] += 1
        for observer in self.observers:
            observer(event, fields)

    # -- worker connections -------------------------------------------------

    def worker_connected(self, connection: WorkerConnection) -> None:
        self.connections.add(connection)
        self.emit("worker_connected")
        self._log.debug("worker connected from {peer}", peer=connection.peer)

    def worker_disconnected(self, connection: WorkerConnection) -> None:
        self.connections.discard(connection)
        self.emit("worker_disconnected")
        self._log.debug(
            "worker connection from {peer} closed after {jobs} jobs",
            peer=connection.peer,
            jobs=connection.jobs_done,
        )

    # -- stalled workers (--worker-stall-timeout) ---------------------------

    def watch_stalls(self, watch: Any) -> None:
        """Check ``watch`` (``last``, ``paused``, ``timeout``, ``stalled()``) until unwatched."""
        self._stall_watches.add(watch)
        if self._stall_timer is None:
            self._stall_timer = self.clock.callLater(self._stall_interval(watch.timeout), self._check_stalls)

    def unwatch_stalls(self, watch: Any) -> None:
        self._stall_watches.discard(watch)

    def stop_watching_stalls(self) -> None:
        """The hub is stopping: no more checks."""
        self._stall_watches.clear()
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None

    @staticmethod
    def _stall_interval(timeout: float) -> float:
        # A stall is noticed between timeout and timeout + interval.
        return max(0.01, min(1.0, timeout / 4))

    def _check_stalls(self) -> None:
        self._stall_timer = None
        if not self._stall_watches:
            return
        now = self.clock.seconds()
        for watch in [w for w in self._stall_watches if not w.paused and now - w.last >= w.timeout]:
            self._stall_watches.discard(watch)
            watch.stalled()
        if self._stall_watches:
            interval = min(self._stall_interval(w.timeout) for w in self._stall_watches)
            self._stall_timer = self.clock.callLater(interval, self._check_stalls)

    # -- jobs ---------------------------------------------------------------

    def job_started(self, job: ProxyJob) -> None:
        self.jobs.add(job)

    def job_ended(self, job: ProxyJob) -> None:
        self.jobs.discard(job)
        if not self.jobs:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no job is queued or in flight."""
        waiter: Deferred[None] = Deferred()
        if not self.jobs:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def in_flight_by_worker(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for job in self.jobs:
            if job.worker is not None:
                counts[job.worker] += 1
        return dict(counts)
