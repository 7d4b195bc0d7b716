"""
Property-based abuse of both hub ports (hypothesis): whatever bytes arrive on
the consumer port or the worker port, the hub keeps serving normal requests.

The hub and a worker run as twistd subprocesses (hypothesis and reactor-based
fixtures do not mix); clients are plain sockets with timeouts.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pothead.testing import free_port, wait_for_port

pytestmark = [pytest.mark.no_reactor, pytest.mark.timeout(240)]

TWISTD = str(Path(sys.executable).parent / "twistd")

# HTTP-ish fragments make generated input reach deeper parser states than
# uniform random bytes would.
FRAGMENTS = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 503 x\r\n",
        b"Host: a\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
        b"Connection: keep-alive\r\n", b"Pothead-Requeue: 1\r\n", b"Upgrade: PTTH/1.0\r\n", b"\r\n", b"\n",
        b"0\r\n\r\n", b"ffffffff\r\n", b"\x00", b" ", b":", b"\xff\xfe",
    ]
)
STREAMS = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=64)), max_size=12).map(b"".join)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    consumer, workers = free_port(), free_port()
    env = dict(os.environ)
    log = open(tmp / "stack.log", "wb")
    hub = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "pothead-hub", f"--listen=tcp:{consumer}:interface=127.0.0.1",
         f"--workers=tcp:{workers}:interface=127.0.0.1", "--queue-timeout=10", "--header-timeout=2"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )
    worker = None
    try:
        wait_for_port(consumer)
        worker = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pothead-worker", f"--connect=127.0.0.1:{workers}", "--threads=2",
             "pothead.demo:app"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
        yield consumer, workers, hub
    finally:
        for process in (worker, hub):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (worker, hub):
            if process is not None:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        log.close()


def _send(port: int, data: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(data)
            s.settimeout(0.3)
            try:
                s.recv(65536)
            except (socket.timeout, OSError):
                pass
    except OSError:
        pass


def _normal_request(port: int) -> tuple[int, bytes]:
    deadline = time.monotonic() + 20
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            conn.request("GET", "/hello?fuzz=1")
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            conn.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=STREAMS)
def test_consumer_port_survives_any_bytes(stack, data: bytes) -> None:
    consumer, _, hub = stack
    _send(consumer, data)
    assert hub.poll() is None


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=STREAMS)
def test_worker_port_survives_any_bytes(stack, data: bytes) -> None:
    _, workers, hub = stack
    _send(workers, data)
    assert hub.poll() is None


def test_hub_still_serves_after_the_abuse(stack) -> None:
    consumer, _, hub = stack
    for _ in range(5):
        status, body = _normal_request(consumer)
        assert status == 200 and b"Hello from pothead worker" in body
    assert hub.poll() is None
