"""
``--redirect-response``: end to end through a real hub.

Most tests run a hub and a worker in the test's reactor (``pothead.testing``)
with blocking ``http.client`` consumers on threads (``deferToThread``), which
never follow redirects.  The memory test and the SIGTERM test run ``twistd``
subprocesses: RSS and signals need a process of their own.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlsplit

import psutil
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from pothead.config import HubConfig, WorkerConfig
from pothead.testing import RunningHub, sleep, start_hub, start_worker, wait_until
from pothead.worker.service import WorkerService

LOOPBACK = "tcp:0:interface=127.0.0.1"
MB = 1024 * 1024
CHUNK = 64 * 1024


# -- a recording app ------------------------------------------------------------------


@dataclass
class Recorder:
    """What the app did, in order, across threads."""

    events: list[tuple[str, str]] = field(default_factory=list)
    produced: dict[str, int] = field(default_factory=dict)
    closed: dict[str, threading.Event] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    times: dict[tuple[str, str], float] = field(default_factory=dict)

    def note(self, what: str, path: str) -> None:
        with self.lock:
            self.events.append((what, path))
            self.times[(what, path)] = time.monotonic()

    def kinds(self, what: str) -> list[str]:
        with self.lock:
            return [path for kind, path in self.events if kind == what]


class Body:
    """A WSGI body iterator that records how far it was pulled and when it was closed."""

    def __init__(self, recorder: Recorder, path: str, chunks: Iterator[bytes]) -> None:
        self.recorder = recorder
        self.path = path
        self.chunks = chunks
        recorder.produced[path] = 0
        recorder.closed[path] = threading.Event()

    def __iter__(self) -> Body:
        return self

    def __next__(self) -> bytes:
        chunk = next(self.chunks)
        self.recorder.produced[self.path] += len(chunk)
        return chunk

    def close(self) -> None:
        self.recorder.note("close", self.path)
        self.recorder.closed[self.path].set()


def block(i: int) -> bytes:
    return i.to_bytes(8, "big") + bytes(CHUNK - 8)


def make_app(recorder: Recorder) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        recorder.note("start", path)
        if path.startswith("/body"):
            start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "yes")])
            return Body(recorder, path, iter([b"part1-", b"part2-", b"", b"part3"]))
        if path.startswith("/large"):
            size = int(environ.get("QUERY_STRING") or 0) or 64 * MB
            start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
            return Body(recorder, path, (block(i) for i in range(size // CHUNK)))
        if path == "/empty":
            start_response("200 OK", [("Content-Length", "0")])
            return Body(recorder, path, iter([]))
        if path == "/missing":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return Body(recorder, path, iter([b"no such thing\n"]))
        if path == "/created":
            start_response("201 Created", [("Content-Type", "text/plain"), ("Location", "/things/1")])
            return [b"made it\n"]
        if path == "/fails":
            raise RuntimeError("boom")
        if path == "/wait":
            # Blocks until the test releases it, then answers 200.
            assert recorder.release.wait(20), "the test never released /wait"
            start_response("200 OK", [("Content-Type", "text/plain")])
            return Body(recorder, path, iter([b"waited\n"]))
        start_response("500 Internal Server Error", [])
        return [b"unknown path\n"]

    return app


# -- clients ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 20.0) -> Reply:
    """A blocking GET that never follows redirects; every socket operation bounded."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", url
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()


async def fetch(url: str, headers: dict[str, str] | None = None) -> Reply:
    return await deferToThread(get, url, headers=headers)


# -- an in-process hub and worker --------------------------------------------------------


@dataclass
class Pair:
    hub: RunningHub
    worker: WorkerService
    recorder: Recorder
    worker_stopped: bool = False

    def url(self, path: str) -> str:
        return self.hub.url(path)

    @property
    def redirect_port(self) -> int:
        listener = self.worker.redirect_listener
        assert listener is not None and listener.port is not None
        return int(listener.port.getHost().port)

    async def stop_worker(self) -> None:
        if not self.worker_stopped:
            self.worker_stopped = True
            await self.worker.stopService()


class _PairContext:
    def __init__(self, threads: int = 1, hub_options: dict[str, Any] | None = None, **worker_options: Any) -> None:
        self.threads = threads
        self.hub_options = hub_options or {}
        self.worker_options = worker_options
        self.recorder = Recorder()

    async def __aenter__(self) -> Pair:
        self.hub = await start_hub(reactor, HubConfig(drain_timeout=5.0, **self.hub_options))
        # drain_timeout bounds the teardown of a failed test (a stream nobody reads).
        options = {"redirect": LOOPBACK, "redirect_expiry": 10.0, "drain_timeout": 5.0, **self.worker_options}
        config = WorkerConfig(threads=self.threads, **options)
        try:
            worker = await start_worker(reactor, make_app(self.recorder), self.hub, config)
        except BaseException:
            await self.hub.service.stopService()
            raise
        self.pair = Pair(self.hub, worker, self.recorder)
        return self.pair

    async def __aexit__(self, *exc: object) -> None:
        self.recorder.release.set()
        try:
            await self.pair.stop_worker()
        finally:
            await self.hub.service.stopService()


def pair(threads: int = 1, hub_options: dict[str, Any] | None = None, **worker_options: Any) -> _PairContext:
    """A hub and a worker with --redirect-response (override with worker_options) serving the recording app."""
    return _PairContext(threads, hub_options, **worker_options)


def key_of(location: str) -> str:
    return urlsplit(location).path.rsplit("/", 1)[-1]


# -- the tests ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_303_then_body_from_the_worker() -> None:
    async with pair() as p:
        reply = await fetch(p.url("/body"))
        assert reply.status == 303, reply
        assert reply.headers["content-length"] == "0"
        assert reply.body == b""
        location = reply.headers["location"]
        # The default base: the address the worker uses to reach the hub, and the redirect port.
        assert location.startswith(f"http://127.0.0.1:{p.redirect_port}/"), location
        key = key_of(location)
        assert len(key) >= 22 and all(c.isalnum() or c in "-_" for c in key), key  # >= 128 bits, URL-safe
        # Parked, not yet streamed: the app's iterator is open and the slot busy.
        assert not p.recorder.closed["/body"].is_set()
        assert p.worker.runtime.idle_connections == 0

        body = await fetch(location)
        assert body.status == 200, body
        assert body.body == b"part1-part2-part3"
        assert body.headers["content-type"] == "text/plain"
        assert body.headers["x-app"] == "yes"
        assert body.headers.get("x-request-id") == reply.headers.get("x-request-id")

        await wait_until(reactor, lambda: p.worker.runtime.idle_connections == 1, timeout=5)
        assert p.recorder.closed["/body"].is_set()
        totals = p.worker.runtime.totals
        assert totals["redirect_parked"] == 1 and totals["redirect_claimed"] == 1
        assert p.worker.runtime.redirects is not None and not p.worker.runtime.redirects.active


@pytest_twisted.ensureDeferred
async def test_empty_200_is_redirected_too() -> None:
    async with pair() as p:
        reply = await fetch(p.url("/empty"))
        assert reply.status == 303
        body = await fetch(reply.headers["location"])
        assert (body.status, body.body) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_key_is_single_use_and_unknown_keys_are_gone() -> None:
    async with pair() as p:
        reply = await fetch(p.url("/body"))
        location = reply.headers["location"]
        first = await fetch(location)
        assert first.status == 200
        second = await fetch(location)
        assert second.status == 410, second
        assert b"410" in second.body and len(second.body) < 200
        unknown = await fetch(f"http://127.0.0.1:{p.redirect_port}/{'A' * 32}")
        assert unknown.status == 410
        assert p.worker.runtime.totals["redirect_refused"] == 2
        assert p.recorder.kinds("start") == ["/body"]  # a refused fetch runs nothing


@pytest_twisted.ensureDeferred
async def test_expired_key_is_gone_and_the_iterator_closed() -> None:
    async with pair(redirect_expiry=0.5) as p:
        reply = await fetch(p.url("/body"))
        assert reply.status == 303
        closed = p.recorder.closed["/body"]
        assert not closed.is_set()
        # Expiry closes the app's iterator (in its WSGI thread) and frees the slot.
        await wait_until(reactor, closed.is_set, timeout=5)
        await wait_until(reactor, lambda: p.worker.runtime.idle_connections == 1, timeout=5)
        late = await fetch(reply.headers["location"])
        assert late.status == 410
        # Only the first chunk (the response starting) was pulled, for nobody.
        assert p.recorder.produced["/body"] == len(b"part1-")
        assert p.worker.runtime.totals["redirect_expired"] == 1
        # The slot takes the next job.
        again = await fetch(p.url("/missing"))
        assert again.status == 404


@pytest_twisted.ensureDeferred
async def test_non_200_responses_pass_through_the_hub() -> None:
    async with pair() as p:
        missing = await fetch(p.url("/missing"))
        assert (missing.status, missing.body) == (404, b"no such thing\n")
        created = await fetch(p.url("/created"))
        assert (created.status, created.body) == (201, b"made it\n")
        assert created.headers["location"] == "/things/1"
        failed = await fetch(p.url("/fails"))
        assert failed.status == 500 and b"request id" in failed.body
        assert p.worker.runtime.totals["redirect_parked"] == 0
        assert p.recorder.closed["/missing"].is_set()


@pytest_twisted.ensureDeferred
async def test_slot_held_and_backpressure_while_the_body_streams() -> None:
    """threads=1: the next job starts only after the redirected body is done, which is pulled as it is read."""
    async with pair(threads=1) as p:
        reply = await fetch(p.url("/large-a"))
        assert reply.status == 303
        location = urlsplit(reply.headers["location"])

        second = deferToThread(get, p.url("/body-b"))
        await sleep(reactor, 0.3)
        assert p.recorder.kinds("start") == ["/large-a"]
        assert p.hub.service.hub.queue.waiting == 1  # the hub holds it: no worker connection is ready

        connection = http.client.HTTPConnection("127.0.0.1", location.port, timeout=20)
        response = None
        try:
            await deferToThread(connection.request, "GET", location.path)
            response = await deferToThread(connection.getresponse)
            assert response.status == 200
            assert response.getheader("content-length") == str(64 * MB)
            received = len(await deferToThread(response.read, CHUNK))
            await sleep(reactor, 0.5)
            # A stalled reader stalls the app: far less than the body was pulled.
            assert p.recorder.produced["/large-a"] < 32 * MB, p.recorder.produced
            assert not p.recorder.closed["/large-a"].is_set()
            assert p.recorder.kinds("start") == ["/large-a"]

            def read_rest() -> int:
                total = 0
                while True:
                    data = response.read(MB)
                    if not data:
                        return total
                    total += len(data)

            received += await deferToThread(read_rest)
        finally:
            if response is not None:
                response.close()
            connection.close()
        assert received == 64 * MB

        b = await second
        assert b.status == 303
        # In order: A's iterator closed before B started.
        events = [event for event in p.recorder.events if event[0] in ("start", "close")]
        assert events[:3] == [("start", "/large-a"), ("close", "/large-a"), ("start", "/body-b")], events
        assert (await fetch(b.headers["location"])).body == b"part1-part2-part3"


@pytest_twisted.ensureDeferred
async def test_consumer_leaving_mid_body_frees_the_slot() -> None:
    async with pair() as p:
        reply = await fetch(p.url("/large"))
        location = urlsplit(reply.headers["location"])
        connection = http.client.HTTPConnection("127.0.0.1", location.port, timeout=20)
        try:
            await deferToThread(connection.request, "GET", location.path)
            response = await deferToThread(connection.getresponse)
            await deferToThread(response.read, CHUNK)
            response.close()  # the socket really closes only once the response lets go of it too
        finally:
            connection.close()
        await wait_until(reactor, p.recorder.closed["/large"].is_set, timeout=10)
        await wait_until(reactor, lambda: p.worker.runtime.idle_connections == 1, timeout=5)
        assert p.recorder.produced["/large"] < 64 * MB


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_a_parked_response_and_parks_no_new_one() -> None:
    async with pair(threads=2) as p:
        parked = await fetch(p.url("/body"))
        assert parked.status == 303
        waiting = deferToThread(get, p.url("/wait"))
        await wait_until(reactor, lambda: "/wait" in p.recorder.kinds("start"), timeout=5)

        p.worker_stopped = True
        stopped = p.worker.stopService()
        await sleep(reactor, 0.3)
        # A response that starts while stopping goes through the hub.
        p.recorder.release.set()
        direct = await waiting
        assert (direct.status, direct.body) == (200, b"waited\n")
        await sleep(reactor, 0.3)
        assert not stopped.called, "the worker stopped with a response still parked"

        body = await fetch(parked.headers["location"])
        assert (body.status, body.body) == (200, b"part1-part2-part3")
        stopped.addTimeout(5, reactor)
        await stopped


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_expiry_of_an_unclaimed_response() -> None:
    async with pair(redirect_expiry=1.0) as p:
        parked = await fetch(p.url("/body"))
        assert parked.status == 303
        started = reactor.seconds()
        p.worker_stopped = True
        stopped = p.worker.stopService()
        stopped.addTimeout(5, reactor)
        await stopped
        assert reactor.seconds() - started >= 0.7
        assert p.recorder.closed["/body"].is_set()
        assert p.worker.runtime.totals["redirect_expired"] == 1


@pytest_twisted.ensureDeferred
async def test_url_base_overrides_the_location() -> None:
    async with pair(redirect_url_base="https://media.example.com/dl") as p:
        reply = await fetch(p.url("/body"))
        location = reply.headers["location"]
        assert location.startswith("https://media.example.com/dl/"), location
        # A proxy in front forwards the whole path: the key is its last segment.
        body = await fetch(f"http://127.0.0.1:{p.redirect_port}/dl/{key_of(location)}")
        assert body.body == b"part1-part2-part3"


# -- subprocesses: memory and SIGTERM ------------------------------------------------------

TWISTD = str(Path(sys.executable).with_name("twistd"))

APP_SOURCE = textwrap.dedent(
    '''
    import time

    CHUNK = 64 * 1024
    BLOCK = bytes(range(256)) * (CHUNK // 256)


    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/big":
            size = int(environ.get("QUERY_STRING") or 0)
            start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
            return (BLOCK for _ in range(size // CHUNK))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        return [b"small\\n"]
    '''
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Processes:
    hub: Any
    worker: Any
    consumer_port: int
    workdir: Path
    inspect_port: int

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.workdir / name).read_text(errors='replace')[-3000:]}" for name in ("hub.log", "worker.log")
        )


def _stop(process: Any) -> None:
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except Exception:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _wait_port(port: int, process: Any, log: Path, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing on 127.0.0.1:{port} after {timeout}s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    import subprocess

    (tmp_path / "redirapp.py").write_text(APP_SOURCE)
    consumer_port, worker_port, redirect_port, inspect_port = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    hub = worker = None
    try:
        with open(tmp_path / "hub.log", "wb") as hub_log:
            hub = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", f"tcp:{consumer_port}:interface=127.0.0.1",
                 "--workers", f"tcp:{worker_port}:interface=127.0.0.1"],
                cwd=tmp_path, env=env, stdout=hub_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        _wait_port(consumer_port, hub, tmp_path / "hub.log")
        with open(tmp_path / "worker.log", "wb") as worker_log:
            worker = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "pothead-worker", "--connect", f"127.0.0.1:{worker_port}",
                 "--redirect-response", f"tcp:{redirect_port}:interface=127.0.0.1", "--redirect-expiry", "30",
                 "--inspect", f"tcp:{inspect_port}:interface=127.0.0.1", "redirapp:app"],
                cwd=tmp_path, env=env, stdout=worker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        _wait_port(redirect_port, worker, tmp_path / "worker.log")
        _wait_port(inspect_port, worker, tmp_path / "worker.log")
        yield Processes(hub, worker, consumer_port, tmp_path, inspect_port)
    finally:
        _stop(worker)
        _stop(hub)


def test_redirected_200mb_body_with_a_slow_reader_keeps_worker_rss_flat(processes: Processes) -> None:
    p = processes
    size, slow_part, pause = 200 * MB, 30 * MB, 0.005
    warm = get(f"http://127.0.0.1:{p.consumer_port}/small")
    assert warm.status == 303, p.logs()
    assert get(warm.headers["location"]).body == b"small\n"
    time.sleep(0.3)
    worker = psutil.Process(p.worker.pid)
    baseline = worker.memory_info().rss

    reply = get(f"http://127.0.0.1:{p.consumer_port}/big?{size}")
    assert reply.status == 303, p.logs()
    location = urlsplit(reply.headers["location"])
    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                samples.append(worker.memory_info().rss)
            except psutil.Error:
                return
            stop_sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    digest = hashlib.sha256()
    received = 0
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", location.port, timeout=30)
    try:
        connection.request("GET", location.path)
        response = connection.getresponse()
        assert response.status == 200, p.logs()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while True:
            n = response.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            received += n
            if received <= slow_part:
                time.sleep(pause)
    finally:
        connection.close()
        stop_sampling.set()
        sampler.join(5)
    seconds = time.monotonic() - started
    growth = (max(samples) - baseline) / MB
    print(f"\n[redirect memory] {received / MB:.0f} MB in {seconds:.1f}s; worker RSS growth {growth:.1f} MB")
    assert received == size
    expected = hashlib.sha256()
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(size // CHUNK):
        expected.update(block)
    assert digest.hexdigest() == expected.hexdigest()
    assert seconds > slow_part / CHUNK * pause  # the reader really was slow
    assert growth < 40, f"worker RSS grew by {growth:.1f} MB while streaming a redirected body\n{p.logs()}"


def test_sigterm_waits_for_the_parked_response_to_be_fetched(processes: Processes) -> None:
    p = processes
    reply = get(f"http://127.0.0.1:{p.consumer_port}/big?{4 * MB}")
    assert reply.status == 303, p.logs()
    os.kill(p.worker.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert p.worker.poll() is None, f"the worker exited with a response parked\n{p.logs()}"
    # The operator sees why it has not exited yet.
    view = get(f"http://127.0.0.1:{p.inspect_port}/inspect").body.decode()
    assert "pothead worker: stopping" in view and "redirects parked: 1" in view, view
    body = get(reply.headers["location"])
    assert body.status == 200 and len(body.body) == 4 * MB
    assert p.worker.wait(timeout=10) == 0, p.logs()
    log = (p.workdir / "worker.log").read_text(errors="replace")
    assert "waiting for 1 parked responses" in log, log
