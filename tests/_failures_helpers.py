"""
Helpers for ``tests/test_failures.py``.

* :class:`FakeWorker` -- a scripted worker connection: it dials the hub's
  worker port like a real worker, reads the HTTP request the hub writes, and
  misbehaves on cue (closes, aborts, answers garbage ...).
* :class:`RawConsumer` -- a consumer connection that writes raw bytes and
  records exactly what came back and how the connection ended.
* :func:`fetch` -- a treq request whose outcome (response or error) is
  returned, never raised, so tests can assert on failures.
* :class:`ControlledApp` -- a WSGI app whose jobs block until the test
  releases them, recording every call.
* :class:`Env` -- starts hubs, workers, fakes and consumers and tears all of
  them down (bounded) at the end of a test, whatever happened.

Everything runs in the reactor thread except the WSGI apps.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from pothead.config import HubConfig, WorkerConfig
from pothead.hub.workers import WorkerConnection
from pothead.testing import RunningHub, start_hub, start_worker, wait_until
from pothead.worker.service import WorkerService

#: Upper bound for any single wait in these tests.
BOUND = 10.0


# -- consumers -------------------------------------------------------------------


@dataclass
class Outcome:
    """What a consumer got: a complete response, or an error (at which stage)."""

    code: int | None = None
    headers: Any = None
    body: bytes = b""  # the whole body (only when complete)
    error: BaseException | None = None
    stage: str = ""  # "response" (no response head) or "body" (head, then the body failed)
    elapsed: float = 0.0

    @property
    def complete(self) -> bool:
        return self.error is None

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name) if self.headers is not None else None
        return values[0] if values else None

    def __repr__(self) -> str:
        if self.error is None:
            return f"<Outcome {self.code} body={self.body[:200]!r}>"
        return f"<Outcome failed at {self.stage}: {self.error!r} code={self.code}>"


async def fetch(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Any = None,
    timeout: float = BOUND,
) -> Outcome:
    """One request on a fresh connection; errors are returned in the Outcome."""
    started = time.monotonic()
    outcome = Outcome()
    try:
        d = treq.request(method, url, data=data, headers=headers, persistent=False)
        response = await d.addTimeout(timeout, reactor)
    except Exception as e:
        outcome.error, outcome.stage = e, "response"
        outcome.elapsed = time.monotonic() - started
        return outcome
    outcome.code, outcome.headers = response.code, response.headers
    try:
        outcome.body = await treq.content(response).addTimeout(timeout, reactor)
    except Exception as e:
        outcome.error, outcome.stage = e, "body"
    outcome.elapsed = time.monotonic() - started
    return outcome


class RawConsumer(Protocol):
    """A consumer connection that writes raw bytes and records what comes back."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()  # fires (with None) on connectionLost
        self.reason: Failure | None = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.ended.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    @property
    def open(self) -> bool:
        return self.reason is None

    @property
    def tcp(self) -> Any:
        """The TCP transport (abortConnection, loseConnection ...)."""
        return self.transport

    def send_request(self, path: str = "/", method: str = "GET", extra: bytes = b"") -> None:
        self.tcp.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"
        )

    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])

    def head_and_body(self) -> tuple[bytes, bytes]:
        head, _, body = self.data.partition(b"\r\n\r\n")
        return head, body


async def connect_consumer(hub: RunningHub) -> RawConsumer:
    consumer = RawConsumer()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", hub.consumer_port), consumer)
    return consumer


# -- fake workers -----------------------------------------------------------------


class FakeWorker(Protocol):
    """
    A scripted worker connection.

    It parses the request head the hub writes and counts body bytes.
    ``on_head(fake)`` is called synchronously as soon as the whole request
    head arrived (so a test can close the connection before the hub wrote
    the body); ``on_body(fake)`` once ``Content-Length`` body bytes arrived.
    """

    def __init__(
        self,
        on_head: Callable[[FakeWorker], None] | None = None,
        on_body: Callable[[FakeWorker], None] | None = None,
    ) -> None:
        self.on_head = on_head
        self.on_body = on_body
        self._buffer = b""
        self.request_line: bytes | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body_received = 0
        self.content_length = 0
        self.head_received: Deferred[FakeWorker] = Deferred()
        self.body_complete: Deferred[FakeWorker] = Deferred()
        self.ended: Deferred[None] = Deferred()  # fires (with None) on connectionLost
        self.reason: Failure | None = None

    # transport events
    def dataReceived(self, data: bytes) -> None:
        if self.request_line is None:
            self._buffer += data
            if b"\r\n\r\n" not in self._buffer:
                return
            head, _, rest = self._buffer.partition(b"\r\n\r\n")
            self._buffer = b""
            lines = head.split(b"\r\n")
            self.request_line = lines[0]
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                self.headers[name.strip().lower()] = value.strip()
            self.content_length = int(self.headers.get(b"content-length", b"0"))
            if self.on_head is not None:
                self.on_head(self)
            self.head_received.callback(self)
            data = rest
            if self.reason is not None:
                return
        self.body_received += len(data)
        if self.body_received >= self.content_length and not self.body_complete.called:
            if self.on_body is not None:
                self.on_body(self)
            self.body_complete.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.ended.callback(None)

    # actions
    @property
    def open(self) -> bool:
        return self.reason is None

    @property
    def tcp(self) -> Any:
        return self.transport

    @property
    def local_port(self) -> int:
        return int(self.tcp.getHost().port)

    def send(self, data: bytes) -> None:
        self.tcp.write(data)

    def close(self) -> None:
        self.tcp.loseConnection()

    def abort(self) -> None:
        self.tcp.abortConnection()

    def stop_reading(self) -> None:
        self.tcp.pauseProducing()


def hub_side(hub: RunningHub, port: int) -> WorkerConnection | None:
    """The hub's WorkerConnection for the worker connection from local ``port``."""
    for connection in hub.service.hub.connections:
        if connection.peer == f"127.0.0.1:{port}":
            return connection
    return None


# -- a controllable WSGI app ------------------------------------------------------


class ControlledApp:
    """
    WSGI app for the tests.  By path:

    * ``/block/NAME`` -- marks NAME started, blocks until ``release(NAME)``
      (at most ``BOUND`` seconds), then answers ``200 done NAME``;
    * ``/stream/NAME`` -- sends ``partial`` first, then blocks like ``/block``;
    * ``/echo`` -- answers the length and SHA-256 of the request body;
    * anything else -- ``200 ok PATH``.

    ``calls`` lists every path the app was called with, in order.
    """

    def __init__(self, label: str = "app") -> None:
        self.label = label
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._started: dict[str, threading.Event] = {}
        self._released: dict[str, threading.Event] = {}
        self._release_all = threading.Event()

    def _event(self, table: dict[str, threading.Event], name: str) -> threading.Event:
        with self._lock:
            return table.setdefault(name, threading.Event())

    def started(self, name: str) -> bool:
        return self._event(self._started, name).is_set()

    def release(self, name: str) -> None:
        self._event(self._released, name).set()

    def release_all(self) -> None:
        self._release_all.set()
        with self._lock:
            events = list(self._released.values())
        for event in events:
            event.set()

    def _block(self, name: str) -> None:
        self._event(self._started, name).set()
        released = self._event(self._released, name)
        deadline = time.monotonic() + BOUND
        while not released.is_set() and not self._release_all.is_set() and time.monotonic() < deadline:
            released.wait(0.02)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "/")
        with self._lock:
            self.calls.append(path)
        if path.startswith("/block/"):
            name = path[len("/block/") :]
            self._block(name)
            body = f"done {name}".encode()
        elif path.startswith("/stream/"):
            name = path[len("/stream/") :]
            return self._stream(name, start_response)
        elif path == "/echo":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            data = environ["wsgi.input"].read(length) if length else b""
            body = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        else:
            body = f"ok {path} from {self.label}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def _stream(self, name: str, start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        self._block(name)
        yield b" rest"


def echo_of(data: bytes) -> bytes:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()


# -- set-up and tear-down -----------------------------------------------------------


class Env:
    """
    Everything one test started, torn down (bounded) on exit: apps released,
    fakes and raw consumers aborted, workers stopped, hubs stopped.
    """

    def __init__(self) -> None:
        self.hubs: list[RunningHub] = []
        self.workers: list[WorkerService] = []
        self.apps: list[Any] = []
        self.connections: list[Protocol] = []
        self._hub_stops: dict[int, Deferred[Any]] = {}
        self._worker_stops: dict[int, Deferred[Any]] = {}

    async def __aenter__(self) -> Env:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def hub(self, config: HubConfig | None = None) -> RunningHub:
        # A short drain so that a failing test does not hang in tear-down.
        hub = await start_hub(reactor, config or HubConfig(drain_timeout=3.0))
        self.hubs.append(hub)
        return hub

    async def worker(
        self, app: Any, hub: RunningHub, *, threads: int = 1, wait: bool = True, **config: Any
    ) -> WorkerService:
        self.apps.append(app)
        worker = await start_worker(
            reactor, app, hub, replace(WorkerConfig(), threads=threads, **config), wait=wait
        )
        self.workers.append(worker)
        return worker

    async def fake(self, hub: RunningHub, **kwargs: Any) -> FakeWorker:
        """A fake worker connection, counted by the hub before this returns."""
        fake = FakeWorker(**kwargs)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", hub.worker_port), fake)
        self.connections.append(fake)
        port = fake.local_port
        await wait_until(reactor, lambda: hub_side(hub, port) is not None or not fake.open, timeout=BOUND)
        return fake

    async def consumer(self, hub: RunningHub) -> RawConsumer:
        consumer = await connect_consumer(hub)
        self.connections.append(consumer)
        return consumer

    def stop_worker(self, worker: WorkerService) -> Deferred[Any]:
        if id(worker) not in self._worker_stops:
            self._worker_stops[id(worker)] = worker.stopService()
        return self._worker_stops[id(worker)]

    def stop_hub(self, hub: RunningHub) -> Deferred[Any]:
        if id(hub) not in self._hub_stops:
            self._hub_stops[id(hub)] = hub.service.stopService()
        return self._hub_stops[id(hub)]

    async def aclose(self) -> None:
        problems: list[str] = []
        for app in self.apps:
            release = getattr(app, "release_all", None)
            if release is not None:
                release()
        for connection in self.connections:
            transport: Any = connection.transport
            if transport is not None and getattr(connection, "reason", None) is None:
                transport.abortConnection()
        for worker in self.workers:
            # Let app threads finish first: a WSGI thread that still has to
            # write through the reactor while WorkerService.stopService joins
            # the pool would deadlock the reactor (test_failures has a test
            # for that; tear-down must not hang on it).
            pool = worker.runtime.threadpool
            try:
                await wait_until(reactor, lambda: not pool.working, timeout=BOUND)
            except TimeoutError:
                problems.append(f"worker {worker!r}: app threads still busy after {BOUND}s")
            if not await bounded(self.stop_worker(worker), BOUND):
                problems.append(f"worker {worker!r} did not stop within {BOUND}s")
        for hub in self.hubs:
            if not await bounded(self.stop_hub(hub), BOUND):
                problems.append(f"hub on port {hub.consumer_port} did not stop within {BOUND}s")
        if problems:
            raise AssertionError("tear-down: " + "; ".join(problems))


async def bounded(d: Deferred[Any], seconds: float) -> bool:
    """Wait for ``d`` (without cancelling it) up to ``seconds``; False on timeout."""
    waiter: Deferred[None] = Deferred()

    def relay(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(relay)
    waiter.addTimeout(seconds, reactor)
    try:
        await waiter
    except DeferredTimeoutError:
        return False
    return True


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
