"""
The failure contract (DESIGN.md, "What happens when things go wrong"), one
test per row, against a real in-process hub.

Workers are either real (:func:`pothead.testing.start_worker` with a small
WSGI app) or *fake*: a scripted connection to the hub's worker port that reads
the request the hub writes and misbehaves on cue
(:class:`_failures_helpers.FakeWorker`).  The last two tests run the
real daemons under ``twistd`` and send them SIGTERM.

Every wait is bounded; every test tears down what it started (``Env``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeoutError, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread

from pothead.config import HubConfig
from pothead.testing import RunningHub, wait_until
from pothead.worker.channel import RETIRE

from _failures_helpers import BOUND, ControlledApp, Env, Outcome, bounded, echo_of, fetch, sleep

#: Large enough that the hub cannot have written all of it into the socket
#: buffers (loopback: <= 4 MiB send buffer + the receiver's window) when a fake
#: worker closes right after reading the request head.
BIG = 16 * 1024 * 1024


def within(d: Deferred[Any], seconds: float = BOUND) -> Deferred[Any]:
    """``d``, failing with TimeoutError after ``seconds``."""
    return d.addTimeout(seconds, reactor)


def queue(hub: RunningHub) -> Any:
    return hub.service.hub.queue


def totals(hub: RunningHub) -> Any:
    return hub.service.hub.totals


def record_hub_events(hub: RunningHub) -> list[tuple[str, dict[str, object]]]:
    events: list[tuple[str, dict[str, object]]] = []
    hub.service.hub.observers.append(lambda event, fields: events.append((event, dict(fields))))
    return events


def outcomes(events: list[tuple[str, dict[str, object]]]) -> list[object]:
    return [fields.get("outcome") for event, fields in events if event == "request"]


def assert_cut_off(outcome: Outcome) -> None:
    """The consumer did not get a clean, complete response -- and not because it timed out."""
    assert not outcome.complete, f"consumer got a clean, complete response: {outcome!r}"
    assert not isinstance(outcome.error, (DeferredTimeoutError, CancelledError)), (
        f"consumer timed out instead of seeing the connection cut off: {outcome!r}"
    )
    assert outcome.elapsed < BOUND / 2


def assert_retry_after(outcome: Outcome) -> None:
    value = outcome.header(b"retry-after")
    assert value is not None and value.isdigit(), f"503 without a usable Retry-After: {outcome.headers!r}"


# -- no worker ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_worker_request_waits_until_a_worker_connects() -> None:
    async with Env() as env:
        hub = await env.hub()
        pending = ensureDeferred(fetch(hub.url("/first")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)
        await sleep(0.5)
        assert not pending.called, "with no worker the request must wait, not fail"

        app = ControlledApp()
        await env.worker(app, hub)
        outcome = await pending
        assert outcome.complete and outcome.code == 200, outcome
        assert outcome.body == b"ok /first from app"
        assert queue(hub).waiting == 0


@pytest_twisted.ensureDeferred
async def test_no_worker_queue_timeout_gives_503_with_retry_after() -> None:
    async with Env() as env:
        hub = await env.hub(HubConfig(queue_timeout=0.5, drain_timeout=3.0))
        outcome = await fetch(hub.url("/late"))
        assert outcome.complete and outcome.code == 503, outcome
        assert_retry_after(outcome)
        assert 0.4 <= outcome.elapsed < 5, outcome.elapsed
        assert queue(hub).waiting == 0

        # The timed-out job is gone for good: a worker connecting now never runs it.
        app = ControlledApp()
        await env.worker(app, hub)
        after = await fetch(hub.url("/after"))
        assert after.code == 200, after
        assert app.calls == ["/after"]


# -- consumer disconnects -------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_consumer_leaves_while_queued_job_is_withdrawn(how: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        consumer = await env.consumer(hub)
        consumer.send_request("/gone")
        await wait_until(reactor, lambda: queue(hub).waiting == 1)

        if how == "close":
            consumer.tcp.loseConnection()
        else:
            consumer.tcp.abortConnection()
        await wait_until(reactor, lambda: queue(hub).waiting == 0 and not hub.service.hub.jobs, timeout=5)

        # A worker connecting now would be paired with the withdrawn job first
        # (it was the oldest); it must get only the next request.
        app = ControlledApp()
        await env.worker(app, hub)
        after = await fetch(hub.url("/after"))
        assert after.code == 200, after
        assert app.calls == ["/after"]


class ProbeApp:
    """An iterator-style app that probes for a disconnect by yielding b"" in a loop."""

    def __init__(self, headers_first: bool) -> None:
        self.headers_first = headers_first
        self.started = threading.Event()
        self.exited = threading.Event()  # GeneratorExit: the server stopped iterating
        self.ran_to_end = threading.Event()  # the disconnect was never noticed
        self.release = threading.Event()

    def release_all(self) -> None:
        self.release.set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] != "/probe":
            body = b"ok"
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [body]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return self._probe()

    def _probe(self) -> Any:
        self.started.set()
        try:
            if self.headers_first:
                yield b"partial"
            deadline = time.monotonic() + BOUND
            while time.monotonic() < deadline and not self.release.is_set():
                time.sleep(0.02)
                yield b""
            self.ran_to_end.set()
            yield b"end"
        except GeneratorExit:
            self.exited.set()
            raise


@pytest.mark.parametrize("headers_first", [False, True], ids=["before-headers", "mid-body"])
@pytest_twisted.ensureDeferred
async def test_consumer_leaves_mid_job_worker_connection_aborted_app_sees_it(headers_first: bool) -> None:
    async with Env() as env:
        hub = await env.hub()
        app = ProbeApp(headers_first)
        worker = await env.worker(app, hub)
        worker_events: list[tuple[str, dict[str, object]]] = []
        worker.runtime.observers.append(lambda event, fields: worker_events.append((event, dict(fields))))
        hub_events = record_hub_events(hub)

        consumer = await env.consumer(hub)
        consumer.send_request("/probe")
        await wait_until(reactor, app.started.is_set)
        if headers_first:
            await wait_until(reactor, lambda: b"partial" in consumer.data)
        disconnects = totals(hub)["worker_disconnected"]

        consumer.tcp.abortConnection()
        # The hub aborts the worker connection ...
        await wait_until(reactor, lambda: totals(hub)["worker_disconnected"] > disconnects, timeout=5)
        # ... the worker notices the job's connection is gone ...
        await wait_until(
            reactor,
            lambda: any(e == "job_finished" and f.get("completed") is False for e, f in worker_events),
            timeout=5,
        )
        # ... and the app's next empty-chunk probe ends its iteration.
        await wait_until(reactor, app.exited.is_set, timeout=5)
        assert not app.ran_to_end.is_set()
        assert outcomes(hub_events) == ["consumer_gone"]

        # The worker reconnects and keeps serving.
        after = await fetch(hub.url("/after"))
        assert after.code == 200, after


# -- worker connection dies before the request was delivered ------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_idle_worker_connection_dies_job_waits_for_next_worker(how: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        fake = await env.fake(hub)
        await wait_until(reactor, lambda: queue(hub).ready == 1)
        getattr(fake, how)()
        await wait_until(reactor, lambda: queue(hub).ready == 0 and not hub.service.hub.connections, timeout=5)

        pending = ensureDeferred(fetch(hub.url("/job")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)
        app = ControlledApp()
        await env.worker(app, hub)
        outcome = await pending
        assert outcome.code == 200 and outcome.body == b"ok /job from app", outcome
        assert fake.request_line is None


@pytest_twisted.ensureDeferred
async def test_worker_dies_before_request_body_written_job_requeued_invisibly() -> None:
    async with Env() as env:
        hub = await env.hub()
        # The oldest ready connection gets the job: the fake connects first.
        fake = await env.fake(hub, on_head=lambda f: f.abort())
        app = ControlledApp()
        await env.worker(app, hub)
        await wait_until(reactor, lambda: queue(hub).ready == 2)

        body = os.urandom(BIG)
        outcome = await fetch(hub.url("/echo"), method="POST", data=body, timeout=30)
        assert fake.request_line == b"POST /echo HTTP/1.1", "the fake worker was meant to get the job first"
        assert fake.body_received < len(body)
        assert outcome.complete and outcome.code == 200, outcome
        assert outcome.body == echo_of(body), "the requeued job must carry its whole body again"
        assert app.calls == ["/echo"]
        assert totals(hub)["worker_disconnected"] == 1, (
            "only the dead connection may go: the healthy connection the job was requeued onto was aborted"
        )
        assert totals(hub)["requeue"] == 1


RETIRE_WITH_BODY = (
    b"HTTP/1.1 503 Service Unavailable\r\nPothead-Requeue: 1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 8\r\n\r\ndraining"
)


@pytest.mark.parametrize("cause", ["dies-during-body", "answers-503-requeue"])
@pytest_twisted.ensureDeferred
async def test_requeued_job_goes_to_the_head_of_the_queue(cause: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        if cause == "dies-during-body":
            # Read the head, then stop reading: the hub is stuck mid-body.
            fake = await env.fake(hub, on_head=lambda f: f.stop_reading())
            body = os.urandom(BIG)
            first = ensureDeferred(fetch(hub.url("/echo"), method="POST", data=body, timeout=30))
            first_path = "/echo"
        else:
            fake = await env.fake(hub)
            body = b""
            first = ensureDeferred(fetch(hub.url("/first")))
            first_path = "/first"
        await within(fake.head_received, 20)

        # Later arrivals queue up behind the job the fake holds.
        second = ensureDeferred(fetch(hub.url("/second")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)
        third = ensureDeferred(fetch(hub.url("/third")))
        await wait_until(reactor, lambda: queue(hub).waiting == 2)

        if cause == "dies-during-body":
            fake.abort()
        else:
            fake.send(RETIRE)
            fake.close()
        await wait_until(reactor, lambda: queue(hub).waiting == 3, timeout=5)
        assert totals(hub)["requeue"] == 1

        app = ControlledApp()
        await env.worker(app, hub)  # one slot: it serves the queue in order
        results = [await first, await second, await third]
        assert [r.code for r in results] == [200, 200, 200], results
        assert app.calls == [first_path, "/second", "/third"], "a requeued job must be served before later arrivals"
        if body:
            assert results[0].body == echo_of(body)


# -- worker dies after the request was written -------------------------------------------


# (A worker that *resets* the connection before any response byte is taken to
# have died with the request unread -- a killed process's kernel sends RST
# when unread bytes remain -- and the job is requeued: see test_soak.py.)
@pytest.mark.parametrize("script", ["get-then-close", "post-body-then-close", "partial-head-then-close"])
@pytest_twisted.ensureDeferred
async def test_worker_dies_after_request_written_gives_502(script: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        data = None
        if script == "get-then-close":
            fake = await env.fake(hub, on_head=lambda f: f.close())
        elif script == "post-body-then-close":
            fake = await env.fake(hub, on_body=lambda f: f.close())
            data = b"y" * 1000
        else:
            fake = await env.fake(hub, on_head=lambda f: (f.send(b"HTTP/1.1 200 OK\r\nContent-Ty"), f.close()))
        outcome = await fetch(hub.url("/job"), method="POST" if data else "GET", data=data)
        assert outcome.complete and outcome.code == 502, outcome
        assert fake.request_line is not None
        if data:
            assert fake.body_received == len(data)
        assert totals(hub)["requeue"] == 0, "a job whose request was delivered must not run twice"

        # Not retried behind the consumer's back either.
        app = ControlledApp()
        await env.worker(app, hub)
        after = await fetch(hub.url("/after"))
        assert after.code == 200, after
        assert app.calls == ["/after"]


# -- draining worker's 503 + Pothead-Requeue ------------------------------------------------


@pytest.mark.parametrize("reply", [RETIRE, RETIRE_WITH_BODY], ids=["retire", "with-body-no-close"])
@pytest_twisted.ensureDeferred
async def test_worker_503_requeue_is_invisible_to_the_consumer(reply: bytes) -> None:
    async with Env() as env:
        hub = await env.hub()
        fake = await env.fake(hub, on_head=lambda f: f.send(reply))
        app = ControlledApp()
        await env.worker(app, hub)
        await wait_until(reactor, lambda: queue(hub).ready == 2)

        outcome = await fetch(hub.url("/job"))
        assert fake.request_line == b"GET /job HTTP/1.1", "the fake worker was meant to get the job first"
        assert outcome.complete and outcome.code == 200, outcome
        assert outcome.body == b"ok /job from app"
        assert totals(hub)["requeue"] == 1
        # The hub does not reuse a connection whose worker said it is going away.
        await within(fake.ended, 5)


# -- worker dies mid-body ------------------------------------------------------------------

PARTIAL_RESPONSES = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\na\r\n"
    + b"x" * 10
    + b"\r\n",
}


@pytest.mark.parametrize("framing", sorted(PARTIAL_RESPONSES))
@pytest_twisted.ensureDeferred
async def test_worker_dies_mid_body_consumer_connection_aborted(framing: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        events = record_hub_events(hub)
        fake = await env.fake(hub, on_head=lambda f: f.send(PARTIAL_RESPONSES[framing]))
        consumer = await env.consumer(hub)
        consumer.send_request("/job")
        # The consumer has the head and the first bytes ...
        await wait_until(reactor, lambda: b"xxxxxxxxxx" in consumer.data)
        assert consumer.status() == 200
        # ... then the worker dies.
        fake.close()
        await within(consumer.ended, 5)
        head, body = consumer.head_and_body()
        if framing == "content-length":
            assert b"\r\ncontent-length: 1000" in head.lower(), head
            assert len(body) < 1000
        else:
            assert b"transfer-encoding: chunked" in head.lower(), head
            assert not body.endswith(b"0\r\n\r\n"), "the hub must not end a truncated body cleanly"
        assert outcomes(events) == ["truncated"]


@pytest.mark.parametrize("framing", sorted(PARTIAL_RESPONSES))
@pytest_twisted.ensureDeferred
async def test_worker_dies_mid_body_http_client_sees_failure(framing: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        await env.fake(hub, on_head=lambda f: (f.send(PARTIAL_RESPONSES[framing]), f.close()))
        outcome = await fetch(hub.url("/job"))
        assert_cut_off(outcome)


# -- malformed worker response ---------------------------------------------------------------

GARBAGE = {
    "garbage-status-line": b"GARBAGE\r\n\r\n",
    "non-numeric-status": b"HTTP/1.1 abc Bad\r\nContent-Length: 0\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\nbanana",
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
@pytest_twisted.ensureDeferred
async def test_malformed_worker_response_gives_502_and_hub_keeps_serving(garbage: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        fake = await env.fake(hub, on_head=lambda f: f.send(GARBAGE[garbage]))
        outcome = await fetch(hub.url("/job"))
        assert outcome.complete and outcome.code == 502, outcome
        await within(fake.ended, 5)  # the hub dropped the connection
        assert totals(hub)["requeue"] == 0

        app = ControlledApp()
        await env.worker(app, hub)
        for i in range(2):
            after = await fetch(hub.url(f"/after{i}"))
            assert after.code == 200, after
        assert app.calls == ["/after0", "/after1"]


# -- queue full ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_queue_full_gives_503_at_once() -> None:
    async with Env() as env:
        hub = await env.hub(HubConfig(max_queue=2, drain_timeout=3.0))
        first = ensureDeferred(fetch(hub.url("/a")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)
        second = ensureDeferred(fetch(hub.url("/b")))
        await wait_until(reactor, lambda: queue(hub).waiting == 2)

        third = await fetch(hub.url("/c"))
        assert third.complete and third.code == 503, third
        assert_retry_after(third)
        assert third.elapsed < 2, "a full queue must refuse at once"
        assert queue(hub).waiting == 2

        app = ControlledApp()
        await env.worker(app, hub)
        assert [(await first).code, (await second).code] == [200, 200]
        assert app.calls == ["/a", "/b"]


# -- hub drain (SIGTERM to the hub) -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hub_drain_finishes_running_and_queued_jobs() -> None:
    async with Env() as env:
        hub = await env.hub(HubConfig(drain_timeout=10.0))
        app = ControlledApp()
        await env.worker(app, hub)
        early = await env.consumer(hub)  # connected before the drain, idle

        running = ensureDeferred(fetch(hub.url("/block/a")))
        await wait_until(reactor, lambda: app.started("a"))
        queued = ensureDeferred(fetch(hub.url("/block/b")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)

        stopping = env.stop_hub(hub)
        # New consumers are refused ...
        await wait_until(reactor, lambda: hub.service.consumer_listeners[0].port is None)
        await sleep(0.05)
        refused = await fetch(hub.url("/new"), timeout=3)
        assert isinstance(refused.error, ConnectionRefusedError), refused
        # ... and a request on a connection opened before gets 503 + close.
        early.send_request("/late")
        await wait_until(reactor, lambda: b"\r\n\r\n" in early.data or not early.open, timeout=5)
        assert early.status() == 503, early.data
        assert b"connection: close" in early.data.lower()
        early_closed = await bounded(early.ended, 2)

        await sleep(0.1)
        assert not stopping.called, "the hub must wait for running and queued jobs"
        app.release("a")
        a = await running
        assert a.code == 200 and a.body == b"done a", a
        await wait_until(reactor, lambda: app.started("b"))
        assert not stopping.called
        app.release("b")
        b = await queued
        assert b.code == 200 and b.body == b"done b", b
        await within(stopping, 5)
        assert app.calls == ["/block/a", "/block/b"]
        assert early_closed, (
            "the hub answered 503 with 'Connection: close' during the drain but left the connection open"
        )


@pytest.mark.parametrize("in_flight", ["mid-body", "before-headers"])
@pytest_twisted.ensureDeferred
async def test_hub_drain_timeout_gives_up(in_flight: str) -> None:
    async with Env() as env:
        hub = await env.hub(HubConfig(drain_timeout=0.5))
        app = ControlledApp()
        await env.worker(app, hub)

        consumer = await env.consumer(hub)  # the in-flight job, a 5+ s one
        if in_flight == "mid-body":
            consumer.send_request("/stream/a")
            await wait_until(reactor, lambda: b"partial" in consumer.data)
        else:
            consumer.send_request("/block/a")
            await wait_until(reactor, lambda: app.started("a"))
        queued = ensureDeferred(fetch(hub.url("/block/b")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)

        started = time.monotonic()
        await within(env.stop_hub(hub), 5)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 3, f"stop should give up after ~0.5 s, took {elapsed:.2f}s"

        b = await queued
        assert b.complete and b.code == 503, b
        assert_retry_after(b)

        await wait_until(reactor, lambda: not consumer.open or b"\r\n\r\n" in consumer.data, timeout=5)
        await sleep(0.05)
        head, body = consumer.head_and_body()
        if in_flight == "mid-body":
            assert consumer.status() == 200
            assert not consumer.open
            assert not body.endswith(b"0\r\n\r\n"), "an in-flight job cut off by the drain must not end cleanly"
        else:
            assert consumer.data == b"", (
                f"an in-flight job cut off by the drain must be aborted, got a response: {consumer.data!r}"
            )
        assert app.calls == ["/block/a" if in_flight == "before-headers" else "/stream/a"]


# -- worker drain (SIGTERM to the worker) -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_worker_drain_retires_idle_connections_and_finishes_running_job() -> None:
    async with Env() as env:
        hub = await env.hub()
        app = ControlledApp("w1")
        worker = await env.worker(app, hub, threads=2)
        await wait_until(reactor, lambda: queue(hub).ready == 2)

        running = ensureDeferred(fetch(hub.url("/block/a")))
        await wait_until(reactor, lambda: app.started("a") and queue(hub).ready == 1)

        stopping = env.stop_worker(worker)
        # The idle connection is retired at once ...
        await wait_until(reactor, lambda: queue(hub).ready == 0 and len(hub.service.hub.connections) == 1, timeout=2)
        await sleep(0.2)
        # ... the running job is not cut off, and the stop waits for it.
        assert not stopping.called and not running.called
        app.release("a")
        a = await running
        assert a.complete and a.code == 200 and a.body == b"done a", a
        await within(stopping, 5)

        # A request arriving after the worker stopped waits for another worker.
        later = ensureDeferred(fetch(hub.url("/after")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)
        await sleep(0.3)
        assert not later.called
        other = ControlledApp("w2")
        await env.worker(other, hub)
        c = await later
        assert c.code == 200 and c.body == b"ok /after from w2", c
        assert app.calls == ["/block/a"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_worker_drain_job_queued_behind_its_last_job_is_requeued_not_failed(framing: str) -> None:
    """
    The worker stops while its last job runs (that response says keep-alive:
    it was decided when the job started); a job queued at the hub behind it
    must be requeued when the worker retires the connection, not fail.
    """
    async with Env() as env:
        hub = await env.hub()
        app = ControlledApp("w1")
        worker = await env.worker(app, hub)  # one slot
        path, expected = ("/block/a", b"done a") if framing == "content-length" else ("/stream/a", b"partial rest")
        running = ensureDeferred(fetch(hub.url(path)))
        await wait_until(reactor, lambda: app.started("a"))
        queued = ensureDeferred(fetch(hub.url("/next")))
        await wait_until(reactor, lambda: queue(hub).waiting == 1)

        stopping = env.stop_worker(worker)
        await sleep(0.1)
        app.release("a")
        a = await running
        assert a.code == 200 and a.body == expected, a
        await within(stopping, 5)

        await sleep(0.2)
        assert not queued.called, f"the queued job must wait for another worker, got {queued.result!r}"
        other = ControlledApp("w2")
        await env.worker(other, hub)
        b = await queued
        assert b.code == 200 and b.body == b"ok /next from w2", b
        assert app.calls == [path]


class ComputeApp:
    """
    Computes (blocks) without probing, then answers: a job that does not
    notice its consumer left until it writes.  Before writing it checks that
    the reactor is still turning; if the reactor thread is blocked (joining
    this thread), it returns without writing, so the test fails instead of
    deadlocking.
    """

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.reactor_responsive: bool | None = None

    def release_all(self) -> None:
        self.release.set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] != "/compute":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        self.started.set()
        self.release.wait(BOUND)
        alive = threading.Event()
        cast(Any, reactor).callFromThread(alive.set)
        self.reactor_responsive = alive.wait(2.0)
        self.done.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"result"] if self.reactor_responsive else []


@pytest_twisted.ensureDeferred
async def test_worker_stop_after_consumer_left_mid_job_does_not_block_the_reactor() -> None:
    """
    A consumer leaves while the app computes; the hub aborts the worker
    connection and the worker counts the job as over, but the app's thread is
    still running.  Stopping the worker now must wait for that thread without
    blocking the reactor (the thread needs the reactor for its last write).
    """
    async with Env() as env:
        hub = await env.hub()
        app = ComputeApp()
        worker = await env.worker(app, hub)
        worker_events: list[tuple[str, dict[str, object]]] = []
        worker.runtime.observers.append(lambda event, fields: worker_events.append((event, dict(fields))))

        consumer = await env.consumer(hub)
        consumer.send_request("/compute")
        await wait_until(reactor, app.started.is_set)
        consumer.tcp.abortConnection()
        # The hub sees the consumer go and aborts the worker connection...
        await wait_until(reactor, lambda: hub.service.hub.totals["request"] >= 1, timeout=5)
        await wait_until(reactor, lambda: not any(s.links for s in worker.runtime.slots), timeout=5)
        # ...but the job is not over while the app still computes: its slot
        # (thread, gate grant) stays taken, so concurrency limits stay true.
        assert not any(e == "job_finished" for e, _ in worker_events)
        assert any(s.request is not None for s in worker.runtime.slots)

        # The app finishes its computation shortly after the stop began.
        timer = threading.Timer(0.5, app.release.set)
        timer.start()
        try:
            stopped = await bounded(env.stop_worker(worker), BOUND)
        finally:
            timer.cancel()
            app.release.set()
        await wait_until(reactor, app.done.is_set)
        assert any(e == "job_finished" and f.get("completed") is False for e, f in worker_events)
        assert app.reactor_responsive, (
            "WorkerService.stopService blocked the reactor thread while a WSGI thread was still running "
            "(ThreadPool.stop() joins it; its write via blockingCallFromThread would deadlock)"
        )
        assert stopped


@pytest_twisted.ensureDeferred
async def test_request_crossing_a_retired_connection_is_requeued() -> None:
    """The hub writes a request onto an idle connection just as the worker retires it."""
    async with Env() as env:
        hub = await env.hub()
        app = ControlledApp("w1")
        worker = await env.worker(app, hub)
        await wait_until(reactor, lambda: queue(hub).ready == 1)
        (connection,) = hub.service.hub.connections
        stops: list[Deferred[Any]] = []
        original = connection.dispatch

        def dispatch_while_the_worker_stops(*args: Any) -> Any:
            sent = original(*args)
            # The request is on its way; the worker has not read it yet.
            stops.append(env.stop_worker(worker))
            return sent

        setattr(connection, "dispatch", dispatch_while_the_worker_stops)
        pending = ensureDeferred(fetch(hub.url("/crossing")))
        await wait_until(reactor, lambda: bool(stops))
        await within(stops[0], 5)
        await wait_until(reactor, lambda: queue(hub).waiting == 1 or pending.called, timeout=5)
        assert not pending.called, f"the crossing request must be requeued, got {pending.result!r}"
        assert totals(hub)["requeue"] == 1

        other = ControlledApp("w2")
        await env.worker(other, hub)
        outcome = await pending
        assert outcome.code == 200 and outcome.body == b"ok /crossing from w2", outcome
        assert app.calls == []


# -- application errors ------------------------------------------------------------------------------


def failing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    if path == "/raise-in-call":
        raise RuntimeError("boom before start_response")
    if path == "/raise-in-iterator":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def fail_first() -> Any:
            raise RuntimeError("boom before the first chunk")
            yield b"never"

        return fail_first()
    if path in ("/raise-mid-body", "/raise-mid-body-length"):
        headers = [("Content-Type", "text/plain")]
        if path.endswith("-length"):
            headers.append(("Content-Length", "100"))
        start_response("200 OK", headers)

        def fail_later() -> Any:
            yield b"partial"
            raise RuntimeError("boom mid-body")

        return fail_later()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.mark.parametrize("path", ["/raise-in-call", "/raise-in-iterator"])
@pytest_twisted.ensureDeferred
async def test_app_error_before_response_gives_500_with_request_id(path: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        await env.worker(failing_app, hub)
        request_id = f"failures-{path.strip('/')}"
        outcome = await fetch(hub.url(path), headers={b"X-Request-Id": [request_id.encode()]})
        assert outcome.complete and outcome.code == 500, outcome
        assert request_id.encode() in outcome.body, outcome.body
        assert outcome.header(b"x-request-id") == request_id.encode()
        # A generated id is reported the same way.
        generated = await fetch(hub.url(path))
        assert generated.code == 500
        rid = generated.header(b"x-request-id")
        assert rid and rid in generated.body, (rid, generated.body)
        # The worker survives its app's errors.
        ok = await fetch(hub.url("/ok"))
        assert ok.code == 200 and ok.body == b"ok"


@pytest.mark.parametrize("path", ["/raise-mid-body", "/raise-mid-body-length"])
@pytest_twisted.ensureDeferred
async def test_app_error_mid_body_consumer_connection_aborted(path: str) -> None:
    async with Env() as env:
        hub = await env.hub()
        events = record_hub_events(hub)
        await env.worker(failing_app, hub)
        outcome = await fetch(hub.url(path))
        assert_cut_off(outcome)
        assert outcomes(events) == ["truncated"]

        consumer = await env.consumer(hub)
        consumer.send_request(path)
        await within(consumer.ended, 5)
        head, body = consumer.head_and_body()
        if consumer.status() is not None:
            assert consumer.status() == 200
            if path.endswith("-length"):
                assert len(body) < 100
            else:
                assert not body.endswith(b"0\r\n\r\n")
        ok = await fetch(hub.url("/ok"))
        assert ok.code == 200


# -- the daemons under twistd, stopped with SIGTERM ------------------------------------------------------

TWISTD = str(Path(sys.executable).with_name("twistd"))

SLOW_APP = '''
import os, time

_DIR = os.environ["POTHEAD_TEST_DIR"]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/slow/"):
        name = path[len("/slow/"):]
        open(os.path.join(_DIR, "started-" + name), "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(_DIR, "release-" + name)) and time.monotonic() < deadline:
            time.sleep(0.02)
    body = ("done %s in pid %d\\n" % (path, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemons:
    """twistd processes for one test, killed by PID if still running at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "slowapp.py").write_text(SLOW_APP)
        self.consumer_port = free_port()
        self.worker_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.consumer_port}{path}"

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.directory)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["POTHEAD_TEST_DIR"] = str(self.directory)
        log = self.directory / f"{name}.log"
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--logfile={log}", *args],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / f"{name}.stderr", "wb"),
        )
        self.processes[name] = process
        return process

    def hub(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(
            "hub",
            [
                "pothead-hub",
                f"--listen=tcp:{self.consumer_port}:interface=127.0.0.1",
                f"--workers=tcp:{self.worker_port}:interface=127.0.0.1",
                *extra,
            ],
        )

    def worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        return self.start(name, ["pothead-worker", f"--connect=127.0.0.1:{self.worker_port}", "slowapp:app"])

    def logs(self) -> str:
        out = []
        for name in self.processes:
            for suffix in ("log", "stderr"):
                path = self.directory / f"{name}.{suffix}"
                if path.exists():
                    out.append(f"--- {path.name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def mark(self, name: str) -> Path:
        return self.directory / name

    async def exit_code(self, name: str, timeout: float = BOUND) -> int:
        process = self.processes[name]
        try:
            await wait_until(reactor, lambda: process.poll() is not None, timeout=timeout, interval=0.05)
        except TimeoutError:
            raise AssertionError(f"{name} (pid {process.pid}) did not exit within {timeout}s\n{self.logs()}") from None
        return process.returncode

    def terminate(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGTERM)

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(5)


def accepts(port: int) -> bool:
    """Blocking: does 127.0.0.1:port accept a connection?  (Run in a thread.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


async def until_serving(daemons: Daemons) -> None:
    deadline = time.monotonic() + 20
    while not await deferToThread(accepts, daemons.consumer_port):
        if time.monotonic() > deadline:
            raise AssertionError(f"hub did not listen within 20s\n{daemons.logs()}")
        await sleep(0.1)
    # Waits in the hub's queue until the worker has connected.
    ping = await fetch(daemons.url("/ping"), timeout=20)
    assert ping.code == 200, f"{ping!r}\n{daemons.logs()}"


@pytest_twisted.ensureDeferred
async def test_twistd_worker_sigterm_finishes_running_job_and_exits_0(tmp_path: Path) -> None:
    daemons = Daemons(tmp_path)
    try:
        daemons.hub("--drain-timeout=10")
        daemons.worker()
        await until_serving(daemons)

        job = ensureDeferred(fetch(daemons.url("/slow/a"), timeout=20))
        await wait_until(reactor, lambda: daemons.mark("started-a").exists(), timeout=BOUND)
        daemons.terminate("worker")
        await sleep(0.5)
        assert daemons.processes["worker"].poll() is None, f"worker exited before its job finished\n{daemons.logs()}"
        daemons.mark("release-a").touch()

        outcome = await job
        assert outcome.complete and outcome.code == 200, f"{outcome!r}\n{daemons.logs()}"
        assert outcome.body.startswith(b"done /slow/a")
        assert await daemons.exit_code("worker") == 0, daemons.logs()

        daemons.terminate("hub")
        assert await daemons.exit_code("hub") == 0, daemons.logs()
    finally:
        daemons.cleanup()


@pytest_twisted.ensureDeferred
async def test_twistd_hub_sigterm_drains_queued_job_and_exits_0(tmp_path: Path) -> None:
    daemons = Daemons(tmp_path)
    try:
        daemons.hub("--drain-timeout=15")
        daemons.worker()  # one slot
        await until_serving(daemons)

        running = ensureDeferred(fetch(daemons.url("/slow/a"), timeout=30))
        await wait_until(reactor, lambda: daemons.mark("started-a").exists(), timeout=BOUND)
        queued = ensureDeferred(fetch(daemons.url("/slow/b"), timeout=30))
        await sleep(0.5)  # /slow/b reaches the hub and waits in its queue
        daemons.terminate("hub")

        # The hub stops accepting consumers but stays up for its jobs.
        deadline = time.monotonic() + 5
        while await deferToThread(accepts, daemons.consumer_port):
            assert time.monotonic() < deadline, f"hub still accepts consumers after SIGTERM\n{daemons.logs()}"
            await sleep(0.1)
        assert daemons.processes["hub"].poll() is None, f"hub exited with jobs left\n{daemons.logs()}"
        assert "1 queued" in (tmp_path / "hub.log").read_text(), f"/slow/b was not queued\n{daemons.logs()}"

        daemons.mark("release-a").touch()
        a = await running
        assert a.complete and a.code == 200, f"{a!r}\n{daemons.logs()}"
        await wait_until(reactor, lambda: daemons.mark("started-b").exists(), timeout=BOUND)
        daemons.mark("release-b").touch()
        b = await queued
        assert b.complete and b.code == 200, f"{b!r}\n{daemons.logs()}"
        assert await daemons.exit_code("hub") == 0, daemons.logs()

        daemons.terminate("worker")
        assert await daemons.exit_code("worker") == 0, daemons.logs()
    finally:
        daemons.cleanup()
