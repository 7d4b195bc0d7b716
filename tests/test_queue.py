"""
Unit tests of :class:`pothead.hub.queue.JobQueue`: the pure pairing logic.

No reactor and no sockets: Deferreds fire synchronously, and the queue's clock
is a :class:`FakeClock` the tests move by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from pothead.hub.queue import JobQueue, QueueFull


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Job:
    """What a consumer job sees of its queue Deferred."""

    name: str
    deferred: Deferred[Any]
    paired: list[Any] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def connection(self) -> Any:
        assert len(self.paired) <= 1, f"{self.name} paired more than once: {self.paired}"
        return self.paired[0] if self.paired else None

    @property
    def cancelled(self) -> bool:
        return any(f.check(CancelledError) for f in self.failures)


def job(queue: JobQueue[Any], name: str, *, front: bool = False, log: list[tuple[str, Any]] | None = None) -> Job:
    """Enqueue a job and record what happens to its Deferred."""
    j = Job(name, queue.get_connection(front=front))

    def paired(connection: Any) -> None:
        j.paired.append(connection)
        if log is not None:
            log.append((name, connection))

    def failed(failure: Failure) -> None:
        j.failures.append(failure)

    j.deferred.addCallbacks(paired, failed)
    return j


def withdraw(deferred: Deferred[Any]) -> None:
    """Cancel a queue Deferred nobody else watches, consuming its CancelledError."""
    deferred.addErrback(lambda failure: failure.trap(CancelledError))
    deferred.cancel()


def assert_not_both(queue: JobQueue[Any]) -> None:
    assert not (queue.waiting and queue.ready), f"waiting={queue.waiting} and ready={queue.ready} at once"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> JobQueue[Any]:
    return JobQueue(clock)


# -- pairing order -------------------------------------------------------------


def test_jobs_first_are_paired_fifo(queue: JobQueue[Any]) -> None:
    log: list[tuple[str, Any]] = []
    jobs = [job(queue, f"j{i}", log=log) for i in range(5)]
    assert queue.waiting == 5 and queue.ready == 0
    assert all(j.connection is None for j in jobs)

    for i in range(5):
        queue.connection_ready(f"c{i}")
        assert_not_both(queue)
        assert queue.waiting == 4 - i
        assert queue.ready == 0

    assert log == [(f"j{i}", f"c{i}") for i in range(5)]
    assert [j.connection for j in jobs] == [f"c{i}" for i in range(5)]


def test_connections_first_are_handed_out_oldest_ready_first(queue: JobQueue[Any]) -> None:
    for i in range(4):
        queue.connection_ready(f"c{i}")
        assert_not_both(queue)
    assert queue.ready == 4 and queue.waiting == 0
    assert all(queue.is_ready(f"c{i}") for i in range(4))

    jobs = [job(queue, f"j{i}") for i in range(4)]
    # Each job is paired at once (its Deferred has already fired) ...
    assert all(j.deferred.called for j in jobs)
    # ... with the connection that has been ready longest.
    assert [j.connection for j in jobs] == ["c0", "c1", "c2", "c3"]
    assert queue.ready == 0 and queue.waiting == 0
    assert not any(queue.is_ready(f"c{i}") for i in range(4))

    # Nothing ready any more: the next job waits.
    late = job(queue, "late")
    assert late.connection is None and queue.waiting == 1


def test_freed_connection_goes_to_the_back_of_the_ready_pool(queue: JobQueue[Any]) -> None:
    # Oldest-ready first spreads work: a connection that just finished a job
    # is used after the ones that have been idle longer.
    for name in ("a", "b", "c"):
        queue.connection_ready(name)
    first = job(queue, "j1")
    assert first.connection == "a"
    queue.connection_ready("a")  # job done, keep-alive
    assert [job(queue, f"j{i}").connection for i in range(2, 5)] == ["b", "c", "a"]


def test_mixed_arrivals_keep_fifo_and_never_both(queue: JobQueue[Any]) -> None:
    log: list[tuple[str, Any]] = []
    queue.connection_ready("c0")
    j0 = job(queue, "j0", log=log)  # paired at once
    j1 = job(queue, "j1", log=log)
    j2 = job(queue, "j2", log=log)
    assert_not_both(queue)
    queue.connection_ready("c1")
    queue.connection_ready("c2")
    queue.connection_ready("c3")  # nobody waits: parked
    assert_not_both(queue)
    assert queue.ready == 1 and queue.waiting == 0
    j3 = job(queue, "j3", log=log)
    assert log == [("j0", "c0"), ("j1", "c1"), ("j2", "c2"), ("j3", "c3")]
    assert [j.connection for j in (j0, j1, j2, j3)] == ["c0", "c1", "c2", "c3"]


# -- requeue at the head --------------------------------------------------------


def test_requeue_at_the_head_beats_earlier_queued_jobs(queue: JobQueue[Any]) -> None:
    log: list[tuple[str, Any]] = []
    job(queue, "a", log=log)
    job(queue, "b", log=log)
    # A job whose worker connection went stale is put back at the head.
    job(queue, "requeued", front=True, log=log)
    assert queue.waiting == 3
    job(queue, "c", log=log)
    for i in range(4):
        queue.connection_ready(f"c{i}")
    assert [name for name, _ in log] == ["requeued", "a", "b", "c"]


def test_requeue_with_a_ready_connection_is_paired_at_once(queue: JobQueue[Any]) -> None:
    queue.connection_ready("c0")
    requeued = job(queue, "requeued", front=True)
    assert requeued.connection == "c0"
    assert queue.waiting == 0 and queue.ready == 0


def test_requeue_in_front_of_cancelled_head(queue: JobQueue[Any]) -> None:
    log: list[tuple[str, Any]] = []
    a = job(queue, "a", log=log)
    job(queue, "b", log=log)
    a.deferred.cancel()
    job(queue, "requeued", front=True, log=log)
    queue.connection_ready("c0")
    queue.connection_ready("c1")
    assert log == [("requeued", "c0"), ("b", "c1")]
    assert a.connection is None


# -- cancellation ----------------------------------------------------------------


def test_cancel_withdraws_the_job(queue: JobQueue[Any]) -> None:
    a = job(queue, "a")
    b = job(queue, "b")
    c = job(queue, "c")
    assert queue.waiting == 3

    b.deferred.cancel()
    assert b.cancelled
    assert queue.waiting == 2

    queue.connection_ready("c0")
    queue.connection_ready("c1")
    queue.connection_ready("c2")  # nobody left to take it
    assert (a.connection, b.connection, c.connection) == ("c0", None, "c1")
    assert b.paired == []
    assert queue.waiting == 0 and queue.ready == 1 and queue.is_ready("c2")


def test_cancel_head_and_tail(queue: JobQueue[Any]) -> None:
    jobs = [job(queue, f"j{i}") for i in range(4)]
    jobs[0].deferred.cancel()
    jobs[3].deferred.cancel()
    assert queue.waiting == 2
    queue.connection_ready("x")
    queue.connection_ready("y")
    queue.connection_ready("z")
    assert [j.connection for j in jobs] == [None, "x", "y", None]
    assert queue.ready == 1


def test_cancel_twice_counts_once(queue: JobQueue[Any]) -> None:
    a = job(queue, "a")
    job(queue, "b")
    a.deferred.cancel()
    a.deferred.cancel()
    assert queue.waiting == 1


def test_cancel_after_pairing_changes_nothing(queue: JobQueue[Any]) -> None:
    a = job(queue, "a")
    b = job(queue, "b")
    queue.connection_ready("c0")
    assert a.connection == "c0"
    a.deferred.cancel()  # already fired: a no-op
    assert not a.cancelled
    assert queue.waiting == 1
    queue.connection_ready("c1")
    assert b.connection == "c1"
    assert queue.waiting == 0 and queue.ready == 0


def test_cancel_every_job_then_connection_is_parked(queue: JobQueue[Any]) -> None:
    jobs = [job(queue, f"j{i}") for i in range(10)]
    for j in jobs:
        j.deferred.cancel()
    assert queue.waiting == 0
    queue.connection_ready("c0")
    assert queue.ready == 1 and queue.is_ready("c0")
    assert all(j.paired == [] for j in jobs)


def test_cancelled_waiters_do_not_accumulate(queue: JobQueue[Any]) -> None:
    # Consumers come and go (or time out) while no worker is connected.
    for _ in range(100_000):
        withdraw(queue.get_connection())
    assert queue.waiting == 0
    assert len(queue._waiters) <= 64 + 1, len(queue._waiters)
    # And the queue still works.
    j = job(queue, "after")
    queue.connection_ready("c0")
    assert j.connection == "c0"


def test_cancelled_waiters_bounded_with_live_waiters(queue: JobQueue[Any]) -> None:
    live = [job(queue, f"live{i}") for i in range(20)]
    for i in range(50_000):
        withdraw(queue.get_connection(front=(i % 7 == 0)))
    assert queue.waiting == 20
    assert len(queue._waiters) <= 2 * 20 + 64 + 1, len(queue._waiters)
    for i in range(20):
        queue.connection_ready(f"c{i}")
    assert [j.connection for j in live] == [f"c{i}" for i in range(20)]


def test_cancelled_waiters_bounded_under_churn(queue: JobQueue[Any]) -> None:
    # A steady queue where the oldest job always gives up as a new one comes.
    window = [job(queue, f"j{i}") for i in range(50)]
    for i in range(50_000):
        window.append(job(queue, f"n{i}"))
        window.pop(0).deferred.cancel()
    assert queue.waiting == 50
    assert len(queue._waiters) <= 2 * 50 + 64 + 1, len(queue._waiters)
    for i in range(50):
        queue.connection_ready(f"c{i}")
    assert [j.connection for j in window] == [f"c{i}" for i in range(50)]


# -- max_queue ---------------------------------------------------------------------


def test_max_queue_refuses_new_jobs(clock: FakeClock) -> None:
    queue: JobQueue[Any] = JobQueue(clock, max_queue=2)
    job(queue, "a")
    job(queue, "b")
    with pytest.raises(QueueFull):
        queue.get_connection()
    assert queue.waiting == 2


def test_max_queue_never_refuses_requeues(clock: FakeClock) -> None:
    queue: JobQueue[Any] = JobQueue(clock, max_queue=2)
    log: list[tuple[str, Any]] = []
    job(queue, "a", log=log)
    job(queue, "b", log=log)
    r1 = job(queue, "r1", front=True, log=log)
    r2 = job(queue, "r2", front=True, log=log)
    assert queue.waiting == 4
    assert not r1.failures and not r2.failures
    with pytest.raises(QueueFull):
        queue.get_connection()
    for i in range(4):
        queue.connection_ready(f"c{i}")
    assert [name for name, _ in log][:2] in (["r2", "r1"], ["r1", "r2"])
    assert [name for name, _ in log][2:] == ["a", "b"]


def test_max_queue_frees_room_on_cancel_and_pairing(clock: FakeClock) -> None:
    queue: JobQueue[Any] = JobQueue(clock, max_queue=1)
    a = job(queue, "a")
    with pytest.raises(QueueFull):
        queue.get_connection()
    a.deferred.cancel()
    b = job(queue, "b")  # room again
    with pytest.raises(QueueFull):
        queue.get_connection()
    queue.connection_ready("c0")
    assert b.connection == "c0"
    job(queue, "c")  # room again


def test_max_queue_does_not_refuse_when_a_connection_is_ready(clock: FakeClock) -> None:
    queue: JobQueue[Any] = JobQueue(clock, max_queue=0)
    queue.connection_ready("c0")
    assert job(queue, "a").connection == "c0"
    with pytest.raises(QueueFull):
        queue.get_connection()


# -- connections leaving -----------------------------------------------------------


def test_connection_gone_leaves_the_ready_pool(queue: JobQueue[Any]) -> None:
    for name in ("a", "b", "c"):
        queue.connection_ready(name)
    queue.connection_gone("b")
    assert queue.ready == 2
    assert not queue.is_ready("b")
    assert [job(queue, f"j{i}").connection for i in range(2)] == ["a", "c"]
    late = job(queue, "late")
    assert late.connection is None, "a gone connection must never be handed out"


def test_connection_gone_unknown_or_busy_is_harmless(queue: JobQueue[Any]) -> None:
    queue.connection_gone("never-seen")
    queue.connection_ready("a")
    j = job(queue, "j")
    assert j.connection == "a"
    queue.connection_gone("a")  # busy connection died: nothing to remove
    assert queue.ready == 0 and queue.waiting == 0


def test_take_ready_empties_the_pool_in_order(queue: JobQueue[Any]) -> None:
    for name in ("a", "b", "c"):
        queue.connection_ready(name)
    queue.connection_gone("b")
    assert queue.take_ready() == ["a", "c"]
    assert queue.ready == 0
    assert queue.take_ready() == []
    late = job(queue, "late")
    assert late.connection is None and queue.waiting == 1


# -- re-entrancy --------------------------------------------------------------------


def test_connection_handed_back_from_a_callback_goes_to_the_next_job(queue: JobQueue[Any]) -> None:
    # ProxyJob._dispatch hands a connection back when the consumer is gone.
    handed_back: Deferred[Any] = queue.get_connection()
    handed_back.addCallback(queue.connection_ready)
    nxt = job(queue, "next")
    queue.connection_ready("c0")
    assert nxt.connection == "c0"
    assert queue.waiting == 0 and queue.ready == 0


def test_new_job_from_a_callback(queue: JobQueue[Any]) -> None:
    inner: list[Job] = []
    first = queue.get_connection()
    first.addCallback(lambda _: inner.append(job(queue, "inner")))
    job(queue, "second")
    queue.connection_ready("c0")
    assert queue.waiting == 2  # "second" and "inner", in that order
    queue.connection_ready("c1")
    queue.connection_ready("c2")
    assert inner[0].connection == "c2"


# -- oldest_wait ----------------------------------------------------------------------


def test_oldest_wait(clock: FakeClock, queue: JobQueue[Any]) -> None:
    assert queue.oldest_wait() == 0.0
    a = job(queue, "a")
    clock.advance(3)
    b = job(queue, "b")
    clock.advance(2)
    assert queue.oldest_wait() == pytest.approx(5.0)
    a.deferred.cancel()
    assert queue.oldest_wait() == pytest.approx(2.0)
    clock.advance(1)
    assert queue.oldest_wait() == pytest.approx(3.0)
    queue.connection_ready("c0")
    assert b.connection == "c0"
    assert queue.oldest_wait() == 0.0


def test_oldest_wait_zero_with_only_ready_connections(clock: FakeClock, queue: JobQueue[Any]) -> None:
    queue.connection_ready("c0")
    clock.advance(10)
    assert queue.oldest_wait() == 0.0


def test_oldest_wait_after_a_requeue_still_sees_older_jobs(clock: FakeClock, queue: JobQueue[Any]) -> None:
    # "Seconds the oldest waiting job has waited": a job requeued at the head
    # now must not hide the jobs that have been waiting for 10 s behind it.
    job(queue, "a")
    clock.advance(10)
    job(queue, "requeued", front=True)
    assert queue.oldest_wait() == pytest.approx(10.0)


# -- property test ---------------------------------------------------------------------


class QueueMachine(RuleBasedStateMachine):
    """
    Drives a JobQueue with arbitrary interleavings and checks it against a
    plain model: a list of waiting jobs (head first) and a list of ready
    connections (oldest first).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.queue: JobQueue[str] = JobQueue(self.clock)
        self.max_queue: int | None = None
        self.jobs: dict[str, Job] = {}
        self.waiting: list[str] = []  # model: head first
        self.since: dict[str, float] = {}
        self.fronted: set[str] = set()
        self.ready: list[str] = []  # model: oldest first
        self.busy: set[str] = set()  # handed to a job, still open
        self.expected: dict[str, str] = {}  # job -> connection it must get
        self.counter = 0

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @initialize(max_queue=st.one_of(st.none(), st.integers(min_value=0, max_value=4)))
    def setup(self, max_queue: int | None) -> None:
        self.max_queue = max_queue
        self.queue = JobQueue(self.clock, max_queue=max_queue)

    @rule(front=st.booleans())
    def enqueue(self, front: bool) -> None:
        name = self._name("j")
        if (
            not self.ready
            and not front
            and self.max_queue is not None
            and len(self.waiting) >= self.max_queue
        ):
            with pytest.raises(QueueFull):
                self.queue.get_connection(front=front)
            return
        self.jobs[name] = job(self.queue, name, front=front)
        if self.ready:
            connection = self.ready.pop(0)
            self.expected[name] = connection
            self.busy.add(connection)
        elif front:
            self.waiting.insert(0, name)
            self.fronted.add(name)
        else:
            self.waiting.append(name)
        self.since[name] = self.clock.now

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.jobs)))
        self.jobs[name].deferred.cancel()
        if name in self.waiting:
            self.waiting.remove(name)
            assert self.jobs[name].cancelled

    def _connection_ready(self, connection: str) -> None:
        self.queue.connection_ready(connection)
        if self.waiting:
            name = self.waiting.pop(0)
            self.expected[name] = connection
            self.busy.add(connection)
        else:
            self.ready.append(connection)

    @rule()
    def new_connection(self) -> None:
        self._connection_ready(self._name("c"))

    @precondition(lambda self: bool(self.busy))
    @rule(data=st.data())
    def job_finished_keep_alive(self, data: st.DataObject) -> None:
        connection = data.draw(st.sampled_from(sorted(self.busy)))
        self.busy.discard(connection)
        self._connection_ready(connection)

    @precondition(lambda self: bool(self.ready or self.busy))
    @rule(data=st.data())
    def connection_gone(self, data: st.DataObject) -> None:
        connection = data.draw(st.sampled_from(sorted(self.ready) + sorted(self.busy)))
        self.queue.connection_gone(connection)
        if connection in self.ready:
            self.ready.remove(connection)
        self.busy.discard(connection)

    @rule()
    def take_ready(self) -> None:
        taken = self.queue.take_ready()
        assert taken == self.ready
        self.ready = []

    @rule(seconds=st.floats(min_value=0, max_value=100, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.queue.waiting == len(self.waiting)
        assert self.queue.ready == len(self.ready)
        for connection in self.ready:
            assert self.queue.is_ready(connection)
        for connection in self.busy:
            assert not self.queue.is_ready(connection)

    @invariant()
    def never_both_waiting_and_ready(self) -> None:
        assert_not_both(self.queue)

    @invariant()
    def each_job_paired_at_most_once_with_the_right_connection(self) -> None:
        for name, j in self.jobs.items():
            assert len(j.paired) + len(j.failures) <= 1, (name, j.paired, j.failures)
            if name in self.expected:
                assert j.paired == [self.expected[name]], (name, j.paired, self.expected[name])
            else:
                assert j.paired == [], (name, j.paired)
            if name in self.waiting:
                assert not j.deferred.called

    @invariant()
    def a_connection_is_never_both_ready_and_busy(self) -> None:
        assert not (set(self.ready) & self.busy)

    @invariant()
    def cancelled_waiters_stay_bounded(self) -> None:
        assert len(self.queue._waiters) <= 2 * self.queue.waiting + 64 + 1

    @invariant()
    def oldest_wait_without_requeues(self) -> None:
        if any(name in self.fronted for name in self.waiting):
            return  # see test_oldest_wait_after_a_requeue_still_sees_older_jobs
        expected = self.clock.now - min(self.since[n] for n in self.waiting) if self.waiting else 0.0
        assert self.queue.oldest_wait() == pytest.approx(expected)


TestQueueProperties = QueueMachine.TestCase
TestQueueProperties.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
