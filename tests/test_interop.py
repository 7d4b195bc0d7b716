"""
Interoperability with the original POTHEAD 0.10.6 (PyPI ``pothead``).

* the ORIGINAL worker serves OUR hub (``python -m pothead.worker`` -> in-process hub);
* OUR worker serves the ORIGINAL hub (in-process worker -> ``python -m pothead.server``).

The reference runs only as subprocesses of ``$POTHEAD_REFERENCE_PYTHON``
(``make test`` sets it to ``.venv-reference/bin/python``), from a temporary
directory and without PYTHONPATH, so it never sees our ``pothead`` package.

What the original hub can carry is limited, and these tests only check that:
it forwards method, path, query and headers but never a request body, and it
answers every consumer with ``200`` and none of the worker's headers.  It also
never reuses a worker connection (one job per connection).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.threads import deferToThread

from _interop_app import app as interop_app, pattern
from _interop_procs import (
    REFERENCE_SKIP_REASON,
    Proc,
    ReferenceHub,
    Reply,
    check_reference,
    http_request,
    install_app,
    kill,
    reference_python,
    spawn_reference_worker,
    start_reference_hub,
    stop,
)
from pothead.config import WorkerConfig
from pothead.testing import RunningHub, start_hub, start_worker, wait_until
from pothead.worker.service import WorkerService

needs_reference = pytest.mark.skipif(reference_python() is None, reason=REFERENCE_SKIP_REASON)


def _reference(tmp_path: Path) -> str:
    python = reference_python()
    assert python is not None
    check_reference(python, tmp_path)
    return python


async def _get(port: int, path: str, **kwargs: Any) -> Reply:
    return await deferToThread(http_request, port, path, **kwargs)


async def _concurrently(port: int, paths: list[str], **kwargs: Any) -> list[Reply]:
    results = await DeferredList([deferToThread(http_request, port, p, **kwargs) for p in paths], fireOnOneErrback=True, consumeErrors=True)
    return [reply for _, reply in results]


def _json(reply: Reply) -> dict[str, Any]:
    assert reply.body, f"empty body (status {reply.status})"
    return json.loads(reply.body)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


# -- the ORIGINAL worker serves OUR hub ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _our_hub_with_reference_worker(tmp_path: Path, workers: int = 1) -> AsyncIterator[tuple[RunningHub, Proc]]:
    python = _reference(tmp_path)
    app = install_app(tmp_path)
    hub = await start_hub(reactor)
    procs: list[Proc] = []
    try:
        proc = spawn_reference_worker(python, tmp_path, hub.worker_port, app, workers=workers)
        procs.append(proc)

        def connected() -> bool:
            if not proc.alive():
                raise AssertionError(f"reference worker exited\n{proc.describe()}")
            return hub.service.hub.queue.ready >= workers

        await wait_until(reactor, connected, timeout=20)
        yield hub, proc
    finally:
        for p in procs:
            await deferToThread(stop, p, 10.0)
        await hub.service.stopService()


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_serves_get_with_path_query_and_forwarding_headers(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        reply = await _get(
            hub.consumer_port,
            "/some/path?x=1&y=two%20words",
            headers={"X-Request-Id": "interop-get-1", "X-Custom-In": "hello"},
        )
        assert reply.status == 200, reply
        seen = _json(reply)
        assert seen["method"] == "GET"
        assert seen["path"] == "/some/path"
        assert seen["query"] == "x=1&y=two%20words"
        headers = seen["headers"]
        assert headers["HTTP_X_CUSTOM_IN"] == "hello"
        assert headers["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert headers["HTTP_X_FORWARDED_PROTO"] == "http"
        assert headers["HTTP_X_FORWARDED_HOST"] == f"127.0.0.1:{hub.consumer_port}"
        # The original worker takes the request id from X-Request-Id.
        assert headers["HTTP_X_REQUEST_ID"] == "interop-get-1"
        assert seen["request_id"] == "interop-get-1"
        assert reply.header("X-Request-Id") == "interop-get-1"
        # Our hub offers reuse; the original ignores the offer.
        assert headers.get("HTTP_POTHEAD_REUSE") == "1"
        assert "HTTP_CONNECTION" not in headers


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_echoes_post_bodies(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        small = await _get(hub.consumer_port, "/echo", method="POST", body=b"hello body \x00\xff", headers={"Content-Type": "application/x-test"})
        assert small.status == 200, small
        seen = _json(small)
        assert seen["method"] == "POST"
        assert seen["body"] == b"hello body \x00\xff".decode("latin-1")
        assert seen["headers"]["CONTENT_LENGTH"] == str(len(b"hello body \x00\xff"))
        assert seen["headers"]["CONTENT_TYPE"] == "application/x-test"

        big_body = pattern(3 * 1024 * 1024 + 7)
        big = await _get(hub.consumer_port, "/echo", method="PUT", body=big_body)
        assert big.status == 200, big
        seen = _json(big)
        assert seen["method"] == "PUT"
        assert seen["body_length"] == len(big_body)
        assert seen["body_sha256"] == hashlib.sha256(big_body).hexdigest()


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_status_reason_and_headers_pass_through(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        for code in (201, 418, 503):
            reply = await _get(hub.consumer_port, f"/status/{code}")
            # A 503 without Pothead-Requeue is the app's answer, not a requeue request.
            assert reply.status == code, reply
            assert reply.reason == "Custom Reason"
            assert reply.header("X-Custom") == "teapot"
            assert [v for n, v in reply.headers if n.lower() == "set-cookie"] == ["a=1", "b=2"]
            assert _json(reply)["path"] == f"/status/{code}"
        assert hub.service.hub.totals["requeue"] == 0


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_answers_head(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        head = await _get(hub.consumer_port, "/big?size=1000", method="HEAD")
        assert head.status == 200, head
        assert head.header("Content-Length") == "1000"
        assert head.body == b""
        after = await _get(hub.consumer_port, "/after-head")
        assert _json(after)["path"] == "/after-head"


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_chunked_and_large_responses(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        streamed = await _get(hub.consumer_port, "/stream?chunks=50")
        assert streamed.status == 200
        assert streamed.body == b"".join(b"chunk %d;" % i for i in range(50))
        big = await _get(hub.consumer_port, "/big?size=%d" % (4 * 1024 * 1024 + 3))
        assert big.status == 200
        assert big.header("Content-Length") == str(4 * 1024 * 1024 + 3)
        assert big.body == pattern(4 * 1024 * 1024 + 3)


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_sequential_requests_never_reuse_a_connection(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path) as (hub, _):
        state = hub.service.hub
        ports = []
        for i in range(6):
            reply = await _get(hub.consumer_port, f"/seq/{i}")
            assert reply.status == 200, reply
            seen = _json(reply)
            assert seen["path"] == f"/seq/{i}"
            ports.append(seen["connection_port"])
        # One job per connection: every job came over a new worker connection,
        # and none was dispatched onto a connection the original had closed.
        assert len(set(ports)) == 6, ports
        assert state.totals["requeue"] == 0
        assert state.totals["worker_connected"] >= 6
        # Finished connections are closed, not put back; the worker's next one is fresh.
        await wait_until(
            reactor,
            lambda: state.queue.ready == 1 and all(c.jobs_done == 0 for c in state.connections),
            timeout=10,
        )


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_with_two_processes_runs_two_jobs_at_once(tmp_path: Path) -> None:
    async with _our_hub_with_reference_worker(tmp_path, workers=2) as (hub, _):
        began = time.monotonic()
        replies = await _concurrently(hub.consumer_port, [f"/sleep?seconds=1&n={i}" for i in range(4)])
        elapsed = time.monotonic() - began
        assert [r.status for r in replies] == [200] * 4
        seen = [_json(r) for r in replies]
        assert sorted(int(s["query"].rsplit("=", 1)[1]) for s in seen) == [0, 1, 2, 3]
        assert _max_overlap([(s["started"], s["finished"]) for s in seen]) == 2
        # Two at a time: about 2 s, clearly less than one at a time (4 s).
        assert 1.9 < elapsed < 3.5, elapsed
        assert hub.service.hub.totals["requeue"] == 0


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_worker_restart_keeps_queued_requests(tmp_path: Path) -> None:
    """SIGTERM closes the original's idle connection; a request then waits for the next worker."""
    python = _reference(tmp_path)
    app = install_app(tmp_path)
    async with _our_hub_with_reference_worker(tmp_path) as (hub, first):
        state = hub.service.hub
        assert await deferToThread(stop, first, 10.0) is not None, first.describe()
        await wait_until(reactor, lambda: state.queue.ready == 0 and not state.connections, timeout=10)
        pending = deferToThread(http_request, hub.consumer_port, "/after-restart", timeout=20)
        await wait_until(reactor, lambda: state.queue.waiting == 1, timeout=10)
        second = spawn_reference_worker(python, tmp_path, hub.worker_port, app, name="reference-worker-2")
        try:
            reply = await pending
            assert reply.status == 200, reply
            assert _json(reply)["path"] == "/after-restart"
            assert _json(reply)["pid"] == second.pid
        finally:
            await deferToThread(stop, second, 10.0)


# -- OUR worker serves the ORIGINAL hub ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _reference_hub_with_our_worker(
    tmp_path: Path, threads: int = 1
) -> AsyncIterator[tuple[ReferenceHub, WorkerService]]:
    python = _reference(tmp_path)
    ref = await deferToThread(start_reference_hub, python, tmp_path)
    worker: WorkerService | None = None
    try:
        worker = await start_worker(
            reactor,
            interop_app,
            f"tcp:host=127.0.0.1:port={ref.worker_port}",
            WorkerConfig(threads=threads),
            wait=False,
        )
        w = worker
        await wait_until(reactor, lambda: w.runtime.idle_connections >= threads, timeout=10)
        yield ref, worker
    finally:
        try:
            if worker is not None:
                await _stop_worker(worker, ref)
        finally:
            await deferToThread(stop, ref.proc, 10.0)


async def _stop_worker(worker: WorkerService, ref: ReferenceHub) -> None:
    if not worker.running:
        return  # already stopped by the test
    stopping = worker.stopService()
    try:
        await wait_until(reactor, lambda: stopping.called, timeout=10)
    except TimeoutError:
        # A slot stuck on a connection the hub never finishes: closing the hub frees it.
        await deferToThread(kill, ref.proc)
        await wait_until(reactor, lambda: stopping.called, timeout=10)
        raise AssertionError("our worker did not stop within 10 s while the reference hub was up") from None
    await stopping


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_serves_get_through_reference_hub(tmp_path: Path) -> None:
    async with _reference_hub_with_our_worker(tmp_path) as (ref, worker):
        reply = await _get(ref.main_port, "/some/path?x=1&y=two%20words", headers={"X-Custom-In": "hello"})
        assert reply.status == 200, reply
        seen = _json(reply)
        assert seen["method"] == "GET"
        assert seen["path"] == "/some/path"
        assert seen["query"] == "x=1&y=two%20words"
        assert seen["headers"]["HTTP_X_CUSTOM_IN"] == "hello"
        assert seen["request_id"]  # our worker makes one up: the original hub sends none
        assert "HTTP_POTHEAD_REUSE" not in seen["headers"]
        assert worker.runtime.totals["job_finished"] == 1


@needs_reference
@pytest_twisted.ensureDeferred
async def test_reference_hub_reports_200_and_drops_worker_headers(tmp_path: Path) -> None:
    """Pins the original hub's limitation (documented in the README), with our worker behind it."""
    async with _reference_hub_with_our_worker(tmp_path) as (ref, _):
        reply = await _get(ref.main_port, "/status/418")
        assert reply.status == 200
        assert reply.header("X-Custom") is None
        assert _json(reply)["path"] == "/status/418"  # the body does come through


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_streamed_and_large_responses_through_reference_hub(tmp_path: Path) -> None:
    async with _reference_hub_with_our_worker(tmp_path) as (ref, _):
        streamed = await _get(ref.main_port, "/stream?chunks=50")
        assert streamed.status == 200
        assert streamed.body == b"".join(b"chunk %d;" % i for i in range(50))
        big = await _get(ref.main_port, "/big?size=%d" % (2 * 1024 * 1024 + 5))
        assert big.status == 200
        assert big.body == pattern(2 * 1024 * 1024 + 5)


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_bodiless_post_through_reference_hub(tmp_path: Path) -> None:
    # The original hub drops request bodies (a POST *with* a body hangs there, with
    # either worker, because it forwards Content-Length without the bytes).
    async with _reference_hub_with_our_worker(tmp_path) as (ref, _):
        reply = await _get(ref.main_port, "/form", method="POST", body=b"")
        assert reply.status == 200, reply
        seen = _json(reply)
        assert seen["method"] == "POST"
        assert seen["body_length"] == 0


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_sequential_requests_through_reference_hub_one_job_per_connection(tmp_path: Path) -> None:
    async with _reference_hub_with_our_worker(tmp_path) as (ref, worker):
        ports = []
        for i in range(6):
            reply = await _get(ref.main_port, f"/seq/{i}", timeout=10)
            assert reply.status == 200, reply
            seen = _json(reply)
            assert seen["path"] == f"/seq/{i}"
            ports.append(seen["connection_port"])
        # The original hub sends no Pothead-Reuse: our worker must close after
        # each job (else the hub would never use that connection again).
        assert len(set(ports)) == 6, ports
        # ... and opens a fresh one for the next job.
        await wait_until(reactor, lambda: worker.runtime.totals["connected"] >= 7, timeout=10)
        assert worker.runtime.totals["job_finished"] == 6


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_with_two_threads_runs_two_jobs_at_once_behind_reference_hub(tmp_path: Path) -> None:
    async with _reference_hub_with_our_worker(tmp_path, threads=2) as (ref, _):
        began = time.monotonic()
        replies = await _concurrently(ref.main_port, [f"/sleep?seconds=1&n={i}" for i in range(4)], timeout=10)
        elapsed = time.monotonic() - began
        assert [r.status for r in replies] == [200] * 4
        seen = [_json(r) for r in replies]
        assert sorted(int(s["query"].rsplit("=", 1)[1]) for s in seen) == [0, 1, 2, 3]
        assert _max_overlap([(s["started"], s["finished"]) for s in seen]) == 2
        assert 1.9 < elapsed < 3.5, elapsed


@needs_reference
@pytest_twisted.ensureDeferred
async def test_our_worker_restart_behind_reference_hub_keeps_queued_requests(tmp_path: Path) -> None:
    """Our worker's SIGTERM retires idle connections (503 + Pothead-Requeue, then close);
    the original hub must not hand that 503 to a consumer, and a request queued
    meanwhile goes to the next worker."""
    async with _reference_hub_with_our_worker(tmp_path) as (ref, first):
        await _stop_worker(first, ref)
        pending = deferToThread(http_request, ref.main_port, "/after-restart", timeout=20)
        second = await start_worker(
            reactor, interop_app, f"tcp:host=127.0.0.1:port={ref.worker_port}", WorkerConfig(threads=1), wait=False
        )
        try:
            reply = await pending
            assert reply.status == 200
            assert _json(reply)["path"] == "/after-restart"
            assert second.runtime.totals["job_finished"] == 1
        finally:
            await _stop_worker(second, ref)


@needs_reference
@pytest_twisted.ensureDeferred
async def test_consumer_sent_pothead_reuse_does_not_wedge_our_worker_behind_reference_hub(tmp_path: Path) -> None:
    """The original hub forwards every consumer header, including ``Pothead-Reuse: 1``.

    Our worker must not then hold that connection open as keep-alive: the
    original never sends a second request on it, so the slot would sit there
    forever and the next consumer would wait forever.
    """
    async with _reference_hub_with_our_worker(tmp_path) as (ref, worker):
        first = await _get(ref.main_port, "/first", headers={"Pothead-Reuse": "1"}, timeout=10)
        assert first.status == 200
        assert _json(first)["path"] == "/first"
        try:
            second = await _get(ref.main_port, "/second", timeout=5)
        except (socket.timeout, TimeoutError, OSError) as e:
            raise AssertionError(
                "a consumer's Pothead-Reuse: 1 header, forwarded by the original hub, left our worker's only "
                f"slot holding a kept-alive connection the original hub never uses again ({e!r})"
            ) from None
        assert _json(second)["path"] == "/second"


# -- reference-compatible mode, at the byte level (no reference needed) ---------------------------------


def _raw_hub_session(listener: socket.socket, requests: list[bytes]) -> list[bytes]:
    """Accept one worker connection and play ``requests`` on it; return what came back per request.

    After each response (Content-Length framed) the next request is written on the
    same connection; after the last one, reads until the worker closes or 1.5 s pass."""
    listener.settimeout(10)
    connection, _ = listener.accept()
    connection.settimeout(10)
    answers = []
    with connection:
        for request in requests:
            connection.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                body += chunk
            answers.append(head + b"\r\n\r\n" + body)
        connection.settimeout(1.5)
        try:
            tail = connection.recv(65536)
            answers.append(b"<closed>" if tail == b"" else tail)
        except socket.timeout:
            answers.append(b"<open>")
    return answers


def _head_has(answer: bytes, header: bytes) -> bool:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return header.lower() in head.split(b"\r\n")


@pytest.mark.parametrize(
    ("reuse", "expected_connection", "expected_end"),
    [(False, b"connection: close", b"<closed>"), (True, b"connection: keep-alive", b"<open>")],
)
@pytest_twisted.ensureDeferred
async def test_our_worker_keeps_alive_only_when_the_hub_offers_reuse(
    reuse: bool, expected_connection: bytes, expected_end: bytes
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    request = b"GET /raw?x=1 HTTP/1.1\r\nHost: hub\r\nX-Request-Id: raw-1\r\n"
    if reuse:
        request += b"Pothead-Reuse: 1\r\n"
    request += b"\r\n"
    session = deferToThread(_raw_hub_session, listener, [request])
    worker = await start_worker(reactor, interop_app, f"tcp:host=127.0.0.1:port={port}", WorkerConfig(threads=1), wait=False)
    try:
        answers = await session
    finally:
        listener.close()
        stopping = worker.stopService()
        await wait_until(reactor, lambda: stopping.called, timeout=10)
        await stopping
    response, end = answers
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert _head_has(response, expected_connection), response[:400]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["request_id"] == "raw-1"
    assert end == expected_end


def _half_request_session(listener: socket.socket, accepted: list[socket.socket]) -> None:
    """Like the original hub with a consumer POST: headers announce a body that never comes."""
    listener.settimeout(10)
    connection, _ = listener.accept()
    accepted.append(connection)
    connection.sendall(b"POST /never HTTP/1.1\r\nHost: hub\r\nContent-Length: 5\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_our_worker_stop_is_not_blocked_by_a_half_received_request() -> None:
    """The original hub forwards a consumer's Content-Length but not the body.

    Our worker then holds a request whose body never arrives.  SIGTERM must
    still stop the worker within a bound (refuse that request, which never
    reached the app, and close), not wait for the hub to hang up."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    worker = await start_worker(reactor, interop_app, f"tcp:host=127.0.0.1:port={port}", WorkerConfig(threads=1), wait=False)
    stopping = None
    try:
        await deferToThread(_half_request_session, listener, accepted)
        await wait_until(reactor, lambda: not worker.runtime.idle_connections, timeout=10)
        stopping = worker.stopService()
        try:
            await wait_until(reactor, lambda: stopping.called, timeout=5)
        except TimeoutError:
            raise AssertionError(
                "our worker did not stop within 5 s: a request whose body never arrives blocks the drain"
            ) from None
        assert worker.runtime.totals["job_started"] == 0
    finally:
        listener.close()
        for connection in accepted:
            connection.close()  # frees the worker if it was stuck
        if stopping is None:
            stopping = worker.stopService()
        await wait_until(reactor, lambda: stopping.called, timeout=10)
        await stopping
