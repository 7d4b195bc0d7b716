"""
Observability, scraped over HTTP as Prometheus and an operator would:
``/metrics``, ``/healthz``, ``/readyz`` on the ``--metrics`` endpoint of both
daemons, the ``PROMETHEUS_MULTIPROC_DIR`` / ``PROMETHEUS_PORT`` compatibility
path, ``--log-format json``, and the Grafana dashboard in ``contrib/grafana``.

Two kinds of tests:

* in-process (pytest-twisted): a real hub and real workers in the test's
  reactor, plus scripted fake worker connections for the failure cases.  The
  metric families are process-global, so these compare values *before and
  after* a known sequence of requests; scrapes are blocking HTTP requests run
  through ``deferToThread``.
* subprocesses (``no_reactor``): ``twistd pothead-hub`` / ``pothead-worker``
  started on loopback, stopped by PID in ``finally``; every wait is bounded.

A job whose response ends with ``Connection: close`` (``--poll-jobs``,
``--no-keep-alive``) must count as complete even when the hub's close reaches
the worker before the WSGI thread's ``finish()`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_twisted
import treq
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from _interop_procs import TWISTD, Proc, Reply, clean_env, free_port, http_request, kill, stop, wait_for
from pothead import metrics as pothead_metrics
from pothead.config import HubConfig, WorkerConfig
from pothead.testing import RunningHub, start_hub, start_worker, wait_until
from pothead.worker.channel import RETIRE
from pothead.worker.service import WorkerService

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "contrib" / "grafana" / "pothead.json"
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"

#: Upper bound of any single wait in this file.
BOUND = 10.0

#: ``reason`` label of the 431 refusal as ConsumerChannel.refuse reports it today.
HEADERS_TOO_LARGE_REASON = "headers_too_large"


# == scraping ======================================================================================


@dataclass
class Scrape:
    """One parsed ``/metrics`` page."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for family in text_string_to_metric_families(self.text):
            self.help[family.name] = family.documentation
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a label set not seen yet.  An unknown *name* is an error."""
        if name not in self.names():
            raise AssertionError(f"{name} is not exported at all; exported: {sorted(self.names())}")
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a sample moved; it must exist afterwards (before, a family may not exist yet)."""
    return after.value(name, **labels) - before.samples.get((name, frozenset(labels.items())), 0.0)


def label_deltas(before: Scrape, after: Scrape, name: str, label: str) -> dict[str, float]:
    """Per value of ``label``: how much ``name`` moved (only the values that moved)."""
    moved: dict[str, float] = {}
    for labels in set(before.series(name)) | set(after.series(name)):
        d = after.samples.get((name, labels), 0.0) - before.samples.get((name, labels), 0.0)
        if d:
            moved[dict(labels)[label]] = d
    return moved


def get(port: int, path: str) -> Reply:
    return http_request(port, path, timeout=BOUND)


def scrape_now(port: int) -> Scrape:
    reply = get(port, "/metrics")
    assert reply.status == 200, reply
    assert (reply.header("content-type") or "").startswith("text/plain"), reply.headers
    return Scrape(reply.body.decode())


async def scrape(port: int) -> Scrape:
    return await deferToThread(scrape_now, port)


async def probe(port: int, path: str) -> Reply:
    return await deferToThread(get, port, path)


def metrics_port(service: Any) -> int:
    listener = service.operator_listener
    assert listener is not None and listener.port is not None, "no --metrics listener"
    return int(listener.port.getHost().port)


# == in-process helpers ============================================================================


class App:
    """WSGI app: ``/block/NAME`` waits for ``release(NAME)`` (bounded); ``/echo`` sizes the body; else ``ok``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self.started: set[str] = set()
        self._all = threading.Event()

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        self._event(name).set()

    def release_all(self) -> None:
        self._all.set()
        with self._lock:
            for event in self._events.values():
                event.set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith("/block/"):
            name = path[len("/block/"):]
            with self._lock:
                self.started.add(name)
            event = self._event(name)
            deadline = time.monotonic() + BOUND
            while not event.is_set() and not self._all.is_set() and time.monotonic() < deadline:
                event.wait(0.02)
        if path == "/echo":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = str(len(environ["wsgi.input"].read(size))).encode()
        else:
            body = f"ok {path}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


class FakeWorker(Protocol):
    """A worker connection that runs ``script(self)`` once the hub's request head has arrived."""

    def __init__(self, script: Callable[[FakeWorker], None]) -> None:
        self.script = script
        self.buffer = b""
        self.head: bytes | None = None
        self.head_received: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.head is not None:
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.head = self.buffer.split(b"\r\n\r\n", 1)[0]
            self.script(self)
            self.head_received.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.head_received.called:
            self.head_received.errback(reason)


def close_after_head(fake: FakeWorker) -> None:
    fake.transport.loseConnection()


def abort_after_head(fake: FakeWorker) -> None:
    fake.transport.abortConnection()


def answer_requeue_after_body(fake: FakeWorker) -> None:
    """A draining worker that reads the whole request, then answers "503 + Pothead-Requeue"."""
    assert fake.head is not None
    length = 0
    for line in fake.head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    seen = len(fake.buffer) - len(fake.head) - 4

    def answer() -> None:
        fake.transport.write(RETIRE)
        fake.transport.loseConnection()

    def more(data: bytes) -> None:
        nonlocal seen
        seen += len(data)
        if seen >= length:
            fake.dataReceived = lambda data: None  # type: ignore[method-assign]
            answer()

    if seen >= length:
        answer()
    else:
        fake.dataReceived = more  # type: ignore[method-assign]


def die_mid_body(fake: FakeWorker) -> None:
    # (loseConnection, not abort: the head and the first bytes must get out.)
    fake.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    fake.transport.loseConnection()


@dataclass
class Result:
    code: int | None = None
    body: bytes | None = None
    headers: Any = None
    error: BaseException | None = None


async def fetch(
    url: str, *, method: str = "GET", data: bytes | None = None, headers: Any = None, allow_redirects: bool = False
) -> Result:
    """One consumer request on a fresh connection; errors are returned, not raised."""
    result = Result()
    try:
        response = await treq.request(
            method, url, data=data, headers=headers, persistent=False, allow_redirects=allow_redirects
        ).addTimeout(BOUND, reactor)
        result.code, result.headers = response.code, response.headers
        result.body = await treq.content(response).addTimeout(BOUND, reactor)
    except Exception as e:
        result.error = e
    return result


def raw_exchange(port: int, data: bytes) -> bytes:
    """Write raw bytes to the hub's consumer port; what came back before it closed (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def bounded(d: Deferred[Any], seconds: float = BOUND) -> Any:
    return await d.addTimeout(seconds, reactor)


class Env:
    """Hubs, workers and fake connections of one test, torn down (bounded) whatever happened."""

    def __init__(self) -> None:
        self.hubs: list[RunningHub] = []
        self.workers: list[WorkerService] = []
        self.apps: list[App] = []
        self.fakes: list[FakeWorker] = []
        self.stopped: dict[int, Deferred[Any]] = {}

    async def hub(self, **config: Any) -> RunningHub:
        config.setdefault("drain_timeout", 3.0)
        hub = await start_hub(reactor, HubConfig(metrics=LOOPBACK_ANY_PORT, **config))
        self.hubs.append(hub)
        return hub

    async def worker(self, app: Any, hub: RunningHub, *, wait: bool = True, **config: Any) -> WorkerService:
        if isinstance(app, App):
            self.apps.append(app)
        config.setdefault("metrics", LOOPBACK_ANY_PORT)
        worker = await start_worker(reactor, app, hub, WorkerConfig(**config), wait=wait)
        self.workers.append(worker)
        return worker

    async def fake(self, hub: RunningHub, script: Callable[[FakeWorker], None]) -> FakeWorker:
        fake = FakeWorker(script)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", hub.worker_port), fake)
        self.fakes.append(fake)
        return fake

    def stop(self, service: Any) -> Deferred[Any]:
        if id(service) not in self.stopped:
            self.stopped[id(service)] = service.stopService()
        return self.stopped[id(service)]

    async def close(self) -> None:
        for app in self.apps:
            app.release_all()
        for fake in self.fakes:
            if fake.transport is not None and fake.transport.connected:
                fake.transport.abortConnection()
        problems = []
        for service in [*self.workers, *(h.service for h in self.hubs)]:
            try:
                await bounded(_observe(self.stop(service)))
            except Exception as e:
                problems.append(f"{service!r} did not stop: {e!r}")
        assert not problems, problems


def _observe(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that fires with ``d`` without consuming ``d`` (so timeouts do not cancel it)."""
    out: Deferred[Any] = Deferred()

    def relay(result: Any) -> Any:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(relay)
    return out


@contextlib.asynccontextmanager
async def environment() -> AsyncIterator[Env]:
    env = Env()
    try:
        yield env
    finally:
        await env.close()


def hub_queue(hub: RunningHub) -> Any:
    return hub.service.hub.queue


# == hub counters, histograms and gauges ============================================================

HUB_REQUESTS = "pothead_hub_requests_total"
HUB_REJECTIONS = "pothead_hub_rejections_total"
QUEUE_WAIT = "pothead_hub_queue_wait_seconds"
HUB_JOB = "pothead_hub_job_duration_seconds"


def assert_histogram_consistent(scrape: Scrape, name: str) -> None:
    """Buckets are cumulative and the +Inf bucket equals _count."""
    buckets = sorted(
        ((float(dict(labels)["le"]), value) for labels, value in scrape.series(f"{name}_bucket").items()),
        key=lambda item: item[0],
    )
    assert buckets, f"{name} has no buckets"
    values = [value for _, value in buckets]
    assert values == sorted(values), f"{name} buckets are not cumulative: {buckets}"
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == scrape.value(f"{name}_count")


@pytest_twisted.ensureDeferred
async def test_hub_metrics_after_a_known_sequence_with_503_and_502() -> None:
    async with environment() as env:
        hub = await env.hub(max_queue=2)
        port = metrics_port(hub.service)
        before = await scrape(port)

        # No worker: two requests queue, the third finds the queue full (503 at once).
        first = ensureDeferred(fetch(hub.url("/first")))
        await wait_until(reactor, lambda: hub_queue(hub).waiting == 1, timeout=BOUND)
        second = ensureDeferred(fetch(hub.url("/second")))  # queued behind /first, not racing it
        await wait_until(reactor, lambda: hub_queue(hub).waiting == 2, timeout=BOUND)
        full = await fetch(hub.url("/third"))
        assert full.code == 503 and full.headers.getRawHeaders(b"retry-after"), full

        queued = await scrape(port)
        assert queued.value("pothead_hub_queue_length") == 2
        assert queued.value("pothead_hub_ready_connections") == 0
        assert queued.value("pothead_hub_jobs_in_flight") == 0
        assert queued.value("pothead_hub_queue_oldest_wait_seconds") > 0

        # A worker connection that closes after reading the request: the oldest job gets 502.
        fake = await env.fake(hub, close_after_head)
        await bounded(fake.head_received)
        bad = await bounded(first)
        assert bad.code == 502, bad
        assert fake.head is not None and fake.head.startswith(b"GET /first "), fake.head

        # A real worker serves the rest.
        # (In one process the hub's and the worker's endpoints export the same
        # registry: the "before" of the worker families is taken here, before
        # the worker can take the queued job.)
        worker_before = await scrape(port)
        app = App()
        worker = await env.worker(app, hub)
        worker_port = metrics_port(worker)
        ok = [await bounded(second), await fetch(hub.url("/fourth")), await fetch(hub.url("/fifth"))]
        assert [r.code for r in ok] == [200, 200, 200], ok

        after = await scrape(port)
        worker_after = await scrape(worker_port)

    assert label_deltas(before, after, HUB_REQUESTS, "code") == {"200": 3, "502": 1, "503": 1}
    assert label_deltas(before, after, HUB_REJECTIONS, "reason") == {"queue_full": 1, "bad_gateway": 1}
    # (A kept-alive worker connection the hub leaves unused for 2 s is retired
    # by the worker; on a loaded machine a job may cross that and be requeued,
    # invisibly.  Nothing else may requeue here.)
    assert set(label_deltas(before, after, "pothead_hub_requeues_total", "reason")) <= {"worker_draining"}
    # Every request that got an answer is one queue-wait observation; the four
    # that reached a worker (three 200s and the 502) are one job each.
    assert delta(before, after, f"{QUEUE_WAIT}_count") == 5
    assert delta(before, after, f"{HUB_JOB}_count") == 4
    assert delta(before, after, f"{QUEUE_WAIT}_sum") > 0
    for name in (QUEUE_WAIT, HUB_JOB):
        assert_histogram_consistent(after, name)

    # Connections: every one opened is either closed or still open.
    opened = delta(before, after, "pothead_hub_worker_connections_opened_total")
    closed = delta(before, after, "pothead_hub_worker_connections_closed_total")
    assert opened >= 2 and closed >= 1, (opened, closed)
    assert opened - closed == after.value("pothead_hub_worker_connections")
    assert after.value("pothead_hub_queue_length") == 0
    assert after.value("pothead_hub_jobs_in_flight") == 0
    assert after.value("pothead_hub_ready_connections") == 1

    # The worker saw the three jobs that reached it.
    assert label_deltas(worker_before, worker_after, "pothead_worker_jobs_total", "code") == {"200": 3}
    assert delta(worker_before, worker_after, "pothead_worker_job_duration_seconds_count") == 3
    assert_histogram_consistent(worker_after, "pothead_worker_job_duration_seconds")


@pytest_twisted.ensureDeferred
async def test_queue_timeout_is_a_503_rejection_and_one_queue_wait() -> None:
    async with environment() as env:
        hub = await env.hub(queue_timeout=0.3)
        port = metrics_port(hub.service)
        before = await scrape(port)
        result = await fetch(hub.url("/nobody-home"))
        assert result.code == 503 and result.headers.getRawHeaders(b"retry-after"), result
        after = await scrape(port)

    assert label_deltas(before, after, HUB_REQUESTS, "code") == {"503": 1}
    assert label_deltas(before, after, HUB_REJECTIONS, "reason") == {"queue_timeout": 1}
    assert delta(before, after, f"{QUEUE_WAIT}_count") == 1
    assert delta(before, after, f"{QUEUE_WAIT}_sum") >= 0.29
    # It waited (at least) 0.3 s: not in the buckets up to 0.25 s.
    assert delta(before, after, f"{QUEUE_WAIT}_bucket", le="0.25") == 0
    assert delta(before, after, f"{QUEUE_WAIT}_bucket", le="+Inf") == 1
    assert delta(before, after, f"{HUB_JOB}_count") == 0


@pytest_twisted.ensureDeferred
async def test_requeues_are_counted_by_reason_and_invisible_in_the_status_counts() -> None:
    body = os.urandom(8 * 1024 * 1024)
    async with environment() as env:
        hub = await env.hub()
        port = metrics_port(hub.service)
        before = await scrape(port)

        # The first connection dies before the big body was written: stale, requeued.
        stale = await env.fake(hub, abort_after_head)
        await wait_until(reactor, lambda: hub_queue(hub).ready == 1, timeout=BOUND)
        pending = ensureDeferred(fetch(hub.url("/echo"), method="POST", data=body))
        await bounded(stale.head_received)
        await wait_until(reactor, lambda: hub.service.hub.totals["requeue"] == 1, timeout=BOUND)

        # The next one answers "503 + Pothead-Requeue" (a draining worker): requeued again.
        draining = await env.fake(hub, answer_requeue_after_body)
        await bounded(draining.head_received)
        await wait_until(reactor, lambda: hub.service.hub.totals["requeue"] == 2, timeout=BOUND)

        await env.worker(App(), hub)
        result = await bounded(pending, 30)
        assert result.code == 200 and result.body == str(len(body)).encode(), result
        after = await scrape(port)

    assert label_deltas(before, after, "pothead_hub_requeues_total", "reason") == {
        "not_delivered": 1,
        "worker_draining": 1,
    }
    assert label_deltas(before, after, HUB_REQUESTS, "code") == {"200": 1}
    assert label_deltas(before, after, HUB_REJECTIONS, "reason") == {}
    assert delta(before, after, f"{QUEUE_WAIT}_count") == 1
    assert delta(before, after, f"{HUB_JOB}_count") == 1


@pytest_twisted.ensureDeferred
async def test_truncated_response_and_refused_requests_are_counted() -> None:
    async with environment() as env:
        hub = await env.hub(max_body=1000, max_header_bytes=2048)
        port = metrics_port(hub.service)
        before = await scrape(port)

        fake = await env.fake(hub, die_mid_body)
        truncated = await fetch(hub.url("/cut-short"))
        await bounded(fake.head_received)
        # The consumer connection is aborted (whether the head got out first is a race).
        assert truncated.error is not None and truncated.body is None, truncated

        too_big = await deferToThread(
            raw_exchange,
            hub.consumer_port,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        )
        assert too_big.startswith(b"HTTP/1.1 413 "), too_big[:200]
        huge_headers = await deferToThread(
            raw_exchange,
            hub.consumer_port,
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 100) for i in range(40)) + b"\r\n",
        )
        assert huge_headers.startswith(b"HTTP/1.1 431 "), huge_headers[:200]
        after = await scrape(port)

    assert delta(before, after, "pothead_hub_responses_aborted_total", reason="worker_failed") == 1
    assert delta(before, after, HUB_REQUESTS, code="200") == 1
    assert label_deltas(before, after, HUB_REJECTIONS, "reason") == {
        "body_too_large": 1,
        HEADERS_TOO_LARGE_REASON: 1,
    }


@pytest_twisted.ensureDeferred
async def test_refused_requests_also_count_by_status() -> None:
    async with environment() as env:
        hub = await env.hub(max_body=1000, max_header_bytes=2048)
        port = metrics_port(hub.service)
        before = await scrape(port)
        await deferToThread(
            raw_exchange, hub.consumer_port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        )
        await deferToThread(
            raw_exchange, hub.consumer_port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
        )
        after = await scrape(port)
    assert label_deltas(before, after, HUB_REQUESTS, "code") == {"413": 1, "431": 1}
    assert label_deltas(before, after, HUB_REJECTIONS, "reason") == {"body_too_large": 1, "headers_too_large": 1}


@pytest_twisted.ensureDeferred
async def test_gauges_show_busy_slots_and_jobs_in_flight() -> None:
    async with environment() as env:
        hub = await env.hub()
        app = App()
        worker = await env.worker(app, hub, threads=2)
        hub_port, worker_port = metrics_port(hub.service), metrics_port(worker)

        idle = await scrape(worker_port)
        assert idle.value("pothead_worker_slots") == 2
        assert idle.value("pothead_worker_threads") == 2
        assert idle.value("pothead_worker_busy_slots") == 0
        assert idle.value("pothead_worker_idle_connections") == 2
        assert idle.value("pothead_worker_connected_hubs") == 1
        assert (await scrape(hub_port)).value("pothead_hub_ready_connections") == 2

        running = ensureDeferred(fetch(hub.url("/block/one")))
        await wait_until(reactor, lambda: "one" in app.started, timeout=BOUND)
        busy = await scrape(worker_port)
        hub_busy = await scrape(hub_port)
        assert busy.value("pothead_worker_busy_slots") == 1
        assert busy.value("pothead_worker_slots") == 2
        assert busy.value("pothead_worker_idle_connections") == 1
        assert hub_busy.value("pothead_hub_jobs_in_flight") == 1
        assert hub_busy.value("pothead_hub_ready_connections") == 1
        assert hub_busy.value("pothead_hub_queue_length") == 0

        app.release("one")
        assert (await bounded(running)).code == 200
        await wait_until(reactor, lambda: worker.runtime.idle_connections == 2, timeout=BOUND)
        done = await scrape(worker_port)
        assert done.value("pothead_worker_busy_slots") == 0
        assert (await scrape(hub_port)).value("pothead_hub_jobs_in_flight") == 0


class OneAtATimeGate:
    """``wait_for_slot``: one grant at a time, released by the grant's ``done()``."""

    def __init__(self) -> None:
        self._free = threading.Semaphore(1)

    def __call__(self, halt: Callable[[], bool]) -> Any:
        while not halt():
            if self._free.acquire(timeout=0.02):
                return self
        return None

    def done(self) -> None:
        self._free.release()


@pytest_twisted.ensureDeferred
async def test_gated_worker_counts_granted_slots_and_their_wait() -> None:
    app = App()
    app.wait_for_slot = OneAtATimeGate()  # type: ignore[attr-defined]
    async with environment() as env:
        hub = await env.hub()
        worker = await env.worker(app, hub, poll_jobs=True)
        port = metrics_port(worker)
        before = await scrape(port)
        for i in range(3):
            assert (await fetch(hub.url(f"/gated/{i}"))).code == 200
        # Each job ends its slot and frees the gate, which grants the next one.
        await wait_until(reactor, lambda: worker.runtime.idle_connections == 1, timeout=BOUND)
        after = await scrape(port)

    assert delta(before, after, "pothead_worker_slots_granted_total") == 3
    assert delta(before, after, "pothead_worker_slot_wait_seconds_count") == 3
    # Three complete jobs, even when the hub's close (a gated slot answers with
    # Connection: close) overtakes the WSGI thread's finish().
    assert label_deltas(before, after, "pothead_worker_jobs_total", "code") == {"200": 3}
    assert after.value("pothead_worker_slots") == 1


@pytest_twisted.ensureDeferred
async def test_redirected_responses_parked_claimed_expired_refused() -> None:
    async with environment() as env:
        hub = await env.hub()
        worker = await env.worker(App(), hub, redirect=LOOPBACK_ANY_PORT, redirect_expiry=0.3)
        port = metrics_port(worker)
        before = await scrape(port)

        fetched = await fetch(hub.url("/fetched"))
        assert fetched.code == 303, fetched
        location = fetched.headers.getRawHeaders(b"location")[0].decode()
        assert location.startswith("http://127.0.0.1:"), location
        body = await fetch(location)
        assert body.code == 200 and body.body == b"ok /fetched", body
        again = await fetch(location)
        assert again.code == 410, again

        left = await fetch(hub.url("/left-unclaimed"))
        assert left.code == 303, left
        await wait_until(reactor, lambda: not worker.runtime.redirects.parked, timeout=BOUND)
        await wait_until(reactor, lambda: not worker.runtime.redirects.active, timeout=BOUND)
        after = await scrape(port)

    assert delta(before, after, "pothead_worker_redirects_parked_total") == 2
    assert delta(before, after, "pothead_worker_redirects_claimed_total") == 1
    assert delta(before, after, "pothead_worker_redirects_expired_total") == 1
    assert delta(before, after, "pothead_worker_redirects_refused_total") == 1
    assert delta(before, after, HUB_REQUESTS, code="303") == 2


# == health ==========================================================================================


@pytest_twisted.ensureDeferred
async def test_hub_ready_until_it_drains() -> None:
    async with environment() as env:
        hub = await env.hub(drain_timeout=5.0)
        port = metrics_port(hub.service)
        health, ready = await probe(port, "/healthz"), await probe(port, "/readyz")
        assert health.status == 200, health
        assert ready.status == 200, ready
        assert (await scrape(port)).value("pothead_hub_draining") == 0

        queued = ensureDeferred(fetch(hub.url("/queued")))
        await wait_until(reactor, lambda: hub_queue(hub).waiting == 1, timeout=BOUND)
        stopping = env.stop(hub.service)  # SIGTERM: drains the queued job
        draining = await probe(port, "/readyz")
        assert draining.status == 503 and b"draining" in draining.body, draining
        assert (await probe(port, "/healthz")).status == 200, "alive while draining"
        assert (await scrape(port)).value("pothead_hub_draining") == 1

        await env.worker(App(), hub)
        assert (await bounded(queued)).code == 200
        await bounded(_observe(stopping))


@pytest_twisted.ensureDeferred
async def test_worker_ready_only_while_connected_to_a_hub() -> None:
    async with environment() as env:
        hub = await env.hub()
        worker = await env.worker(App(), hub)
        port = metrics_port(worker)
        ready = await probe(port, "/readyz")
        assert ready.status == 200, ready
        address = worker.runtime.targets[0].description
        before = await scrape(port)
        assert before.value("pothead_worker_connection_attempts_total", hub=address) >= 1

        await bounded(_observe(env.stop(hub.service)))
        await wait_until(reactor, lambda: worker.runtime.connected_hubs() == 0, timeout=BOUND)
        not_ready = await probe(port, "/readyz")
        assert not_ready.status == 503, not_ready
        assert (await probe(port, "/healthz")).status == 200

        # It keeps trying the hub and counts each failure under the hub's address.
        async def failures() -> float:
            return (await scrape(port)).value("pothead_worker_connection_failures_total", hub=address)

        deadline = time.monotonic() + BOUND
        while await failures() <= before.value("pothead_worker_connection_failures_total", hub=address):
            assert time.monotonic() < deadline, "no connection failure counted for the stopped hub"
            await deferToThread(time.sleep, 0.05)
        after = await scrape(port)
        assert after.value("pothead_worker_connected_hubs") == 0
        assert set(dict(labels)["hub"] for labels in after.series("pothead_worker_connection_failures_total")) >= {address}


@pytest_twisted.ensureDeferred
async def test_scrapes_and_probes_write_no_log_lines() -> None:
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        seen.append(formatEvent(event))

    async with environment() as env:
        hub = await env.hub()
        port = metrics_port(hub.service)
        globalLogPublisher.addObserver(observer)
        try:
            await scrape(port)
            await probe(port, "/readyz")
            await probe(port, "/healthz")
        finally:
            globalLogPublisher.removeObserver(observer)
    noisy = [line for line in seen if "/metrics" in line or "/readyz" in line or "/healthz" in line]
    assert not noisy, noisy


# == conventions =====================================================================================


@pytest_twisted.ensureDeferred
async def test_names_help_and_labels_follow_prometheus_conventions() -> None:
    async with environment() as env:
        hub = await env.hub()
        worker = await env.worker(App(), hub)
        assert (await fetch(hub.url("/some/path?with=query"), headers={b"X-Request-Id": [b"conventions-1"]})).code == 200
        page = await scrape(metrics_port(worker))

    ours = {name: kind for name, kind in page.types.items() if name.startswith("pothead_")}
    assert {n for n in ours if n.startswith("pothead_hub_")} and {n for n in ours if n.startswith("pothead_worker_")}
    for name, kind in ours.items():
        assert re.fullmatch(r"pothead_(hub|worker)_[a-z][a-z0-9_]*", name), name
        assert len(page.help[name]) > 15, f"{name} has no real help text"
        if kind == "counter":
            assert f"{name}_total" in page.names(), f"counter {name} is not exported as {name}_total"
        else:
            assert not name.endswith("_total"), f"{name} is a {kind} named like a counter"
        for unit in ("_ms", "_milliseconds", "_minutes", "_bytes_kb"):
            assert not name.endswith(unit), f"{name}: use base units"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"histogram {name} has no unit"

    # Bounded labels: no request id, path, query or peer port anywhere.
    allowed = {"code", "reason", "hub", "le"}
    for (name, labels) in page.samples:
        if not name.startswith("pothead_"):
            continue
        for key, value in labels:
            assert key in allowed, f"{name} has label {key}={value!r}"
            assert "conventions-1" not in value and "/some/path" not in value, (name, labels)
    text = page.text
    assert "conventions-1" not in text and "with=query" not in text


# == subprocesses: twistd ============================================================================


@dataclass
class Daemon:
    proc: Proc
    stderr: Path

    def stdout(self) -> str:
        return self.proc.output()

    def ports(self) -> dict[str, int]:
        """role -> port, from the "listening for ROLE on 127.0.0.1:PORT" lines."""
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"listening for (\w+) on 127\.0\.0\.1:(\d+)", self.stdout())}

    def describe(self) -> str:
        return self.proc.describe() + "\n--- stderr:\n" + self.stderr.read_text(errors="replace")[-3000:]


def start_daemon(name: str, args: list[str], cwd: Path, env: dict[str, str], roles: set[str]) -> Daemon:
    """Start ``twistd -n ARGS`` with stdout and stderr apart; wait (bounded) until ``roles`` listen."""
    out, err = cwd / f"{name}.log", cwd / f"{name}.stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        popen = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    daemon = Daemon(Proc(name, popen, out), err)
    try:
        def listening() -> bool:
            if not daemon.proc.alive():
                raise RuntimeError(f"{name} exited during start-up\n{daemon.describe()}")
            return roles <= set(daemon.ports())

        try:
            wait_for(listening, 20, f"{name} listens for {sorted(roles)}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{daemon.describe()}") from None
    except BaseException:
        kill(daemon.proc)
        raise
    return daemon


def start_hub_daemon(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    roles = {"consumers", "workers"} | ({"metrics"} if "--metrics" in extra else set())
    return start_daemon(
        "hub",
        ["pothead-hub", "--listen", LOOPBACK_ANY_PORT, "--workers", LOOPBACK_ANY_PORT, "--drain-timeout", "5", *extra],
        tmp_path,
        env or clean_env(),
        roles,
    )


def wait_ready(port: int, what: str) -> None:
    def ready() -> bool:
        try:
            return get(port, "/readyz").status == 200
        except OSError:
            return False

    wait_for(ready, BOUND, f"{what} /readyz 200")


APP_MODULE = '''\
"""A worker app with its own prometheus-client metric, exactly as in the original POTHEAD README."""
from prometheus_client import Counter

REQUEST_TOTAL = Counter(
    'requests_total',
    'Total HTTP requests',
    ['method', 'endpoint']
)


def app(environ, start_response):
    REQUEST_TOTAL.labels(
        method=environ['REQUEST_METHOD'],
        endpoint=environ['PATH_INFO']
    ).inc()
    start_response("200 OK", [('Content-Type','text/plain; charset=utf-8')])
    return ['hello'.encode('utf-8')];
'''


def app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "counting_app.py").write_text(APP_MODULE)
    return directory


def parse_json_lines(text: str, who: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssertionError(f"{who} stdout line {number} is not JSON ({e}): {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    assert records, f"{who} wrote no log lines"
    return records


@pytest.mark.no_reactor
def test_twistd_json_logs_share_request_ids_and_app_counter_is_exported(tmp_path: Path) -> None:
    env = clean_env({"PYTHONPATH": str(app_dir(tmp_path))})
    hub = worker = None
    try:
        hub = start_hub_daemon(tmp_path, "--metrics", LOOPBACK_ANY_PORT, "--log-format", "json")
        hub_ports = hub.ports()
        worker = start_daemon(
            "worker",
            ["pothead-worker", "--connect", f"127.0.0.1:{hub_ports['workers']}", "--metrics", LOOPBACK_ANY_PORT,
             "--log-format", "json", "counting_app:app"],
            tmp_path,
            env,
            {"metrics"},
        )
        worker_metrics = worker.ports()["metrics"]
        wait_ready(worker_metrics, "worker")
        assert get(hub_ports["metrics"], "/readyz").status == 200

        sent = [
            ("GET", "/alpha", {"X-Request-Id": "from-the-consumer-1"}),
            ("GET", "/alpha", {}),
            ("POST", "/beta", {}),
        ]
        ids = []
        for method, path, headers in sent:
            reply = http_request(hub_ports["consumers"], path, method=method, body=b"" if method == "POST" else None,
                                 headers=headers, timeout=BOUND)
            assert reply.status == 200 and reply.body == b"hello", reply
            ids.append(reply.header("x-request-id"))
        assert ids[0] == "from-the-consumer-1" and all(ids) and len(set(ids)) == 3, ids

        app_page = scrape_now(worker_metrics)
        assert app_page.value("requests_total", method="GET", endpoint="/alpha") == 2
        assert app_page.value("requests_total", method="POST", endpoint="/beta") == 1
        assert app_page.help["requests"] == "Total HTTP requests"
        assert app_page.value("pothead_worker_jobs_total", code="200") == 3
        hub_page = scrape_now(hub_ports["metrics"])
        assert hub_page.value(HUB_REQUESTS, code="200") == 3
        assert hub_page.value(f"{QUEUE_WAIT}_count") == 3
        assert "requests_total" not in hub_page.names(), "the app's metrics belong to the worker"

        assert stop(worker.proc, timeout=BOUND) == 0, worker.describe()
        assert stop(hub.proc, timeout=BOUND) == 0, hub.describe()

        hub_log = parse_json_lines(hub.stdout(), "hub")
        worker_log = parse_json_lines(worker.stdout(), "worker")
    finally:
        for daemon in (worker, hub):
            if daemon is not None:
                stop(daemon.proc, timeout=5)

    access = [r for r in hub_log if r.get("access") is True]
    assert [r["request_id"] for r in access] == ids, access
    for record, (method, path, _) in zip(access, sent):
        assert record["method"] == method and record["path"] == path, record
        assert record["status"] == 200 and record["bytes"] == len(b"hello"), record
        assert isinstance(record["queue_wait"], float) and record["queue_wait"] >= 0, record
        assert isinstance(record["job_time"], float) and record["job_time"] >= 0, record
        assert re.fullmatch(r"127\.0\.0\.1:\d+", record["worker"]), record
        assert record["request_id"] in record["message"], record

    worker_ids: dict[str, list[str]] = {}
    for record in worker_log:
        if "request_id" in record:
            worker_ids.setdefault(record["request_id"], []).append(record["message"])
    for request_id in ids:
        messages = worker_ids.get(request_id, [])
        assert any("job started" in m for m in messages) and any("job done" in m for m in messages), (
            request_id,
            worker_ids,
        )


@pytest.mark.no_reactor
def test_multiprocess_dir_is_wiped_and_served_on_prometheus_port(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"junk from a previous run")
    (directory / "leftover").mkdir()
    (directory / "leftover" / "file").write_text("junk")
    prometheus_port = free_port()
    env = clean_env(
        {
            "PYTHONPATH": str(app_dir(tmp_path)),
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
            "PROMETHEUS_PORT": str(prometheus_port),
            # The original binds every interface; these tests stay on loopback.
            "PROMETHEUS_ADDR": "127.0.0.1",
        }
    )
    hub = worker = None
    try:
        hub = start_hub_daemon(tmp_path)
        worker = start_daemon(
            "worker",
            ["pothead-worker", "--connect", f"127.0.0.1:{hub.ports()['workers']}", "counting_app:app"],
            tmp_path,
            env,
            {"metrics"},
        )
        assert worker.ports()["metrics"] == prometheus_port, worker.stdout()
        wait_ready(prometheus_port, "worker")
        assert not (directory / "counter_999999.db").exists() and not (directory / "leftover").exists(), (
            sorted(os.listdir(directory))
        )

        for _ in range(2):
            assert http_request(hub.ports()["consumers"], "/gamma", timeout=BOUND).status == 200
        page = scrape_now(prometheus_port)
        assert page.value("requests_total", method="GET", endpoint="/gamma") == 2
        assert page.value("pothead_worker_jobs_total", code="200") == 2
        assert page.value("pothead_worker_job_duration_seconds_count") == 2
        assert page.value("pothead_worker_slots") == 1  # live levels next to the multiprocess view
        files = sorted(os.listdir(directory))
        assert files and all(name.endswith(".db") for name in files), files
        assert stop(worker.proc, timeout=BOUND) == 0, worker.describe()
    finally:
        for daemon in (worker, hub):
            if daemon is not None:
                stop(daemon.proc, timeout=5)


@pytest.mark.no_reactor
@pytest.mark.parametrize("daemon", ["pothead-hub", "pothead-worker"])
@pytest.mark.parametrize("value", ["missing", "empty"])
def test_multiprocess_dir_that_is_not_a_directory_is_a_one_line_startup_error(
    tmp_path: Path, daemon: str, value: str
) -> None:
    path = str(tmp_path / "no-such-dir") if value == "missing" else ""
    args = [TWISTD, "-n", "--pidfile=", daemon]
    args += ["--listen", LOOPBACK_ANY_PORT, "--workers", LOOPBACK_ANY_PORT] if daemon == "pothead-hub" else ["--connect", "127.0.0.1:1"]
    try:
        result = subprocess.run(
            args, cwd=tmp_path, env=clean_env({"PROMETHEUS_MULTIPROC_DIR": path}), capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired as e:  # run() killed it
        raise AssertionError(f"{daemon} kept running with PROMETHEUS_MULTIPROC_DIR={path!r}: {e.output!r}") from None
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    shown = [line for line in output.splitlines() if line.strip()]
    assert len(shown) == 1, f"expected one line, got:\n{output}"
    assert "PROMETHEUS_MULTIPROC_DIR" in shown[0] and daemon in shown[0], shown[0]
    assert not any(name.endswith(".db") for name in os.listdir(tmp_path)), "prometheus files written to the cwd"


@pytest.mark.no_reactor
def test_reference_command_line_worker_honours_prometheus_multiproc_dir(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "junk.db").write_bytes(b"junk")
    prometheus_port = free_port()
    env = clean_env(
        {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PROMETHEUS_PORT": str(prometheus_port), "PROMETHEUS_ADDR": "127.0.0.1"}
    )
    out = tmp_path / "ref-worker.log"
    with open(out, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "pothead.worker", "--connect", "127.0.0.1:1", "pothead.demo:app"],
            cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    proc = Proc("ref-worker", popen, out)
    try:
        wait_for(lambda: "worker starting" in proc.output() or not proc.alive(), 20, "the worker starts")
        assert proc.alive(), proc.describe()
        assert not (directory / "junk.db").exists(), "PROMETHEUS_MULTIPROC_DIR was not wiped"
        wait_for(lambda: _quietly(lambda: get(prometheus_port, "/healthz").status == 200), 5, "metrics on PROMETHEUS_PORT")
    finally:
        stop(proc, timeout=5)


def _quietly(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except OSError:
        return False


# == the Grafana dashboard ============================================================================


def _declared_metrics() -> dict[str, tuple[str, set[str]]]:
    """Every metric pothead.metrics declares: name -> (type, label names)."""
    declared: dict[str, tuple[str, set[str]]] = {}
    for group in (pothead_metrics.hub_metrics(), pothead_metrics.worker_metrics()):
        for metric in vars(group).values():
            describe = metric.describe()[0]
            kind = "histogram" if isinstance(metric, Histogram) else describe.type
            declared[describe.name] = (kind, set(metric._labelnames))
    # The live levels are gauges without labels; their names are string literals in the collector.
    source = Path(pothead_metrics.__file__).read_text()
    for name in re.findall(r'_gauge\(\s*"(pothead_[a-z0-9_]+)"', source):
        declared[name] = ("gauge", set())
    return declared


def _sample_names(declared: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
    """Series names PromQL can select -> their labels."""
    names: dict[str, set[str]] = {}
    for name, (kind, labels) in declared.items():
        if kind == "counter":
            names[f"{name}_total"] = labels
        elif kind == "histogram":
            names[f"{name}_bucket"] = labels | {"le"}
            names[f"{name}_sum"] = labels
            names[f"{name}_count"] = labels
        else:
            names[name] = labels
    return names


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg", "count",
    "clamp_min", "clamp_max", "or", "and", "unless", "on", "ignoring", "group_left", "group_right", "vector", "abs",
    "topk", "bottomk", "offset", "bool", "label_replace", "time", "delta", "deriv", "changes", "resets", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time",
}
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}


def test_grafana_dashboard_is_valid_and_uses_only_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = _sample_names(_declared_metrics())
    assert names, "no metrics declared?"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}", variable["name"]
            for metric in re.findall(r"\bpothead_[a-z0-9_]+\b", variable["definition"]):
                assert metric in names, f"variable {variable['name']}: {metric} is not a metric pothead exports"

    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[str] = set()
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        assert panel.get("description"), f"panel {title!r} has no description"
        assert panel["targets"], title
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
            bare = re.sub(r'"[^"]*"', '""', expr)  # label values, e.g. "$hub"
            bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
            metrics_here = set(re.findall(r"\bpothead_[a-z0-9_]+\b", bare))
            assert metrics_here, f"{title}: {expr} selects no pothead metric"
            for metric in metrics_here:
                assert metric in names, f"{title}: {metric} is not a metric pothead exports"
                used.add(metric)
            for selector_metric, matchers in re.findall(r"\b(pothead_[a-z0-9_]+)\{([^}]*)\}", bare):
                for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                    assert label in names[selector_metric] | TARGET_LABELS, f"{title}: {selector_metric} has no label {label}"
            for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", bare):
                for label in (l.strip() for l in grouping.split(",") if l.strip()):
                    assert any(label in names[m] for m in metrics_here) or label in TARGET_LABELS, (
                        f"{title}: no metric in {expr} has label {label}"
                    )
            words = set(re.findall(r"\b([a-z_]+)\s*\(", bare))
            assert words <= PROMQL_WORDS, f"{title}: unknown function(s) {words - PROMQL_WORDS} in {expr}"
            if "histogram_quantile" in expr:
                assert "_bucket" in expr and "le" in expr and "rate(" in expr, (title, expr)

    required = {
        "pothead_hub_queue_length",
        "pothead_hub_queue_wait_seconds_bucket",
        "pothead_hub_ready_connections",
        "pothead_hub_jobs_in_flight",
        "pothead_hub_requests_total",
        "pothead_hub_rejections_total",
        "pothead_hub_requeues_total",
        "pothead_hub_job_duration_seconds_bucket",
        "pothead_worker_busy_slots",
        "pothead_worker_slots",
        "pothead_worker_connection_failures_total",
    }
    assert required <= used, f"the dashboard does not show {sorted(required - used)}"
