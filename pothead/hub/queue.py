"""
The hub's central FIFO: pairs waiting jobs with ready worker connections.

Pure pairing logic, no I/O: a job asks for a connection and gets a Deferred
that fires with one; a connection that becomes ready is either handed to the
oldest waiting job at once or parked in the ready pool.

Invariants:

* at any moment either no job is waiting or no connection is ready (never both);
* jobs are served in arrival order, except that a requeued job goes to the head;
* ready connections are handed out oldest-ready first, which spreads work over
  workers instead of piling it on the most recently freed connection;
* cancelling a waiting job's Deferred (the consumer left, or its queue deadline
  passed) removes the job: it is never paired afterwards.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred, succeed

C = TypeVar("C", bound=Hashable)


class QueueFull(Exception):
    """The queue already holds ``max_queue`` waiting jobs."""


class _Waiter(Generic[C]):
    __slots__ = ("deferred", "since", "active")

    def __init__(self, deferred: Deferred[C], since: float) -> None:
        self.deferred = deferred
        self.since = since
        self.active = True


class JobQueue(Generic[C]):
    """
    Jobs waiting for connections, and connections waiting for jobs.

    ``clock`` returns the current time (seconds); it only timestamps waiting
    jobs for :attr:`oldest_wait`.  ``max_queue`` bounds the number of waiting
    jobs (``None``: unbounded); requeued jobs are never refused.
    """

    def __init__(self, clock: Callable[[], float], max_queue: int | None = None) -> None:
        self._clock = clock
        self.max_queue = max_queue
        # Cancelled waiters stay in the deque (removal from the middle is O(n))
        # and are skipped when they reach the head; _waiting counts live ones.
        self._waiters: deque[_Waiter[C]] = deque()
        self._waiting = 0
        # dict as an insertion-ordered set: O(1) removal of a dead connection.
        self._ready: dict[C, None] = {}

    # -- jobs ---------------------------------------------------------------

    def get_connection(self, *, front: bool = False, since: float | None = None) -> Deferred[C]:
        """
        A Deferred that fires with a ready connection for one job.

        ``front=True`` puts the job at the head of the queue (a requeue after a
        stale connection or a draining worker).  Raises :class:`QueueFull`
        when a new job would exceed ``max_queue``.  Cancel the Deferred to
        withdraw the job.  ``since`` is when the job first arrived (a
        requeued job keeps its original arrival time for :meth:`oldest_wait`).
        """
        if self._ready:
            connection = next(iter(self._ready))
            del self._ready[connection]
            return succeed(connection)
        if not front and self.max_queue is not None and self._waiting >= self.max_queue:
            raise QueueFull()

        def cancel(_: Deferred[C]) -> None:
            if waiter.active:
                waiter.active = False
                self._waiting -= 1
                self._compact()

        deferred: Deferred[C] = Deferred(cancel)
        waiter = _Waiter(deferred, self._clock() if since is None else since)
        if front:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._waiting += 1
        return deferred

    def _compact(self) -> None:
        # Bound the memory held by cancelled waiters when jobs come and go
        # while no worker is connected.
        if len(self._waiters) > 2 * self._waiting + 64:
            self._waiters = deque(w for w in self._waiters if w.active)

    # -- connections --------------------------------------------------------

    def connection_ready(self, connection: C) -> None:
        """``connection`` can take one job: give it to the oldest waiting job, or park it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.active:
                continue
            waiter.active = False
            self._waiting -= 1
            waiter.deferred.callback(connection)
            return
        self._ready[connection] = None

    def connection_gone(self, connection: C) -> None:
        """``connection`` can no longer take a job (closed, or taken out of service)."""
        self._ready.pop(connection, None)

    def take_ready(self) -> list[C]:
        """Remove and return every ready connection (used when draining)."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    # -- inspection ---------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Number of jobs waiting for a connection."""
        return self._waiting

    @property
    def ready(self) -> int:
        """Number of connections waiting for a job."""
        return len(self._ready)

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting job has waited (0 when none waits)."""
        while self._waiters and not self._waiters[0].active:
            self._waiters.popleft()
        if not self._waiters:
            return 0.0
        # Usually the head, but a requeued job at the head may be younger than
        # jobs behind it; the deque is bounded (see _compact), so scan it.
        oldest = min(w.since for w in self._waiters if w.active)
        return max(0.0, self._clock() - oldest)

    def is_ready(self, connection: C) -> bool:
        return connection in self._ready
