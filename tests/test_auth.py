"""
Worker authentication (PTTH upgrade, pothead.ptth) and the hub's side of it.

Fake workers are raw sockets in threads, so every byte the hub sends to an
unauthenticated peer is visible.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import replace

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from pothead.config import ConfigError, HubConfig
from pothead.ptth import check_switching, check_upgrade, read_token_file, split_head, upgrade_request
from pothead.testing import start_hub, wait_until

TOKEN = b"s3cret-token-for-tests-0123456789"


# -- pure handshake rules ------------------------------------------------------


def test_check_upgrade_accepts_only_the_right_token() -> None:
    head, rest = split_head(upgrade_request(TOKEN))  # type: ignore[misc]
    assert rest == b""
    assert check_upgrade(head, TOKEN) is None
    assert check_upgrade(head, TOKEN + b"x") == "wrong token"
    assert check_upgrade(head.replace(b"Bearer", b"Basic"), TOKEN) == "Authorization is not a Bearer token"
    assert check_upgrade(head.replace(b"PTTH/1.0", b"websocket"), TOKEN) == "no Upgrade: PTTH/1.0"
    assert check_upgrade(head.replace(b"Connection: Upgrade", b"Connection: close"), TOKEN) == "no Connection: Upgrade"
    assert check_upgrade(b"GET / HTTP/1.1\r\nHost: x", TOKEN) == "not a PTTH upgrade request"
    without = b"\r\n".join(l for l in head.split(b"\r\n") if not l.startswith(b"Authorization"))
    assert check_upgrade(without, TOKEN) == "missing Authorization"


def test_check_switching() -> None:
    assert check_switching(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: PTTH/1.0") is None
    assert check_switching(b"HTTP/1.1 401 Unauthorized") == "hub answered 401 Unauthorized"
    assert check_switching(b"garbage") is not None


def test_token_file_rules(tmp_path) -> None:
    good = tmp_path / "token"
    good.write_bytes(TOKEN + b"\n")
    good.chmod(0o600)
    assert read_token_file(str(good), "--worker-token-file") == (TOKEN, None)
    good.chmod(0o644)
    token, warning = read_token_file(str(good), "--worker-token-file")
    assert token == TOKEN and warning is not None and "chmod 600" in warning
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_token_file(str(short), "--worker-token-file")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"), "--worker-token-file")


# -- the hub refuses strangers -------------------------------------------------


def _fake_worker(port: int, first_bytes: bytes, read_for: float = 2.0) -> bytes:
    """Connect, send ``first_bytes``, return everything the hub sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        if first_bytes:
            s.sendall(first_bytes)
        received = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        except socket.timeout:
            received += b"<still open>"
        return received


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_token_gets_401_and_no_request(monkeypatch) -> None:
    from pothead.hub.workers import WorkerConnection

    monkeypatch.setattr(WorkerConnection, "HANDSHAKE_TIMEOUT", 0.5)
    hub = await start_hub(reactor, HubConfig(worker_token=TOKEN, queue_timeout=30, drain_timeout=0.5))
    try:
        # A consumer request is queued, so any ready connection would get it.
        waiting = treq.get(hub.url("/secret"), persistent=False)
        await wait_until(reactor, lambda: hub.service.hub.queue.waiting == 1)
        for first in (upgrade_request(b"wrong-token-wrong-token"), b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            answer = await deferToThread(_fake_worker, hub.worker_port, first, 5.0)
            assert answer.startswith(b"HTTP/1.1 401"), answer
            assert b"/secret" not in answer
            assert hub.service.hub.queue.waiting == 1
        assert hub.service.hub.totals["worker_refused"] == 3
    finally:
        await hub.service.stopService()
    response = await waiting
    assert response.code == 503  # drained, never served by a stranger
    await response.content()


@pytest_twisted.ensureDeferred
async def test_right_token_gets_101_then_jobs() -> None:
    hub = await start_hub(reactor, HubConfig(worker_token=TOKEN))
    served = threading.Event()

    def authenticated_worker() -> bytes:
        with socket.create_connection(("127.0.0.1", hub.worker_port), timeout=5) as s:
            s.sendall(upgrade_request(TOKEN))
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            request = rest
            while b"\r\n\r\n" not in request:
                request += s.recv(4096)
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
            served.set()
            return request

    try:
        worker = deferToThread(authenticated_worker)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        response = await treq.get(hub.url("/job"), persistent=False)
        assert response.code == 200 and await response.content() == b"hi"
        request = await worker
        assert request.startswith(b"GET /job HTTP/1.1")
        assert b"Bearer" not in request
    finally:
        await hub.service.stopService()


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_closes_silent_peer(monkeypatch) -> None:
    from pothead.hub.workers import WorkerConnection

    monkeypatch.setattr(WorkerConnection, "HANDSHAKE_TIMEOUT", 0.3)
    hub = await start_hub(reactor, HubConfig(worker_token=TOKEN))
    try:
        answer = await deferToThread(_fake_worker, hub.worker_port, b"", 5.0)
        assert answer.startswith(b"HTTP/1.1 401") and b"no PTTH upgrade within" in answer
    finally:
        await hub.service.stopService()
