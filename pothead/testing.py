"""
Helpers for running a real hub and real workers inside one reactor, on
loopback ports chosen by the OS -- for pothead's own tests and for users who
want to test their WSGI app through pothead.

Example (pytest-twisted)::

    @pytest_twisted.ensureDeferred
    async def test_my_app():
        async with running_pair(my_app, threads=2) as pair:
            response = await treq.get(pair.url("/things"))
            assert response.code == 200
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from twisted.internet.defer import Deferred

from .config import HubConfig, WorkerConfig
from .hub.service import HubService
from .worker.service import WorkerService


@dataclass
class RunningHub:
    service: HubService
    consumer_port: int
    worker_port: int

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.consumer_port}{path}"

    @property
    def worker_address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.worker_port}"


async def start_hub(reactor: Any, config: HubConfig | None = None) -> RunningHub:
    """Start a hub listening on 127.0.0.1 with OS-chosen ports."""
    config = replace(
        config or HubConfig(),
        listen=("tcp:0:interface=127.0.0.1",),
        workers=("tcp:0:interface=127.0.0.1",),
    )
    service = HubService(config, reactor)
    service.startService()
    await service.when_listening()
    consumer = service.consumer_listeners[0].port
    workers = service.worker_listeners[0].port
    assert consumer is not None and workers is not None
    return RunningHub(service, consumer.getHost().port, workers.getHost().port)


async def start_worker(
    reactor: Any, app: Any, hub: RunningHub | str, config: WorkerConfig | None = None, *, wait: bool = True
) -> WorkerService:
    """Start a worker serving ``app`` on ``hub``; by default wait until all its slots are connected."""
    address = hub.worker_address if isinstance(hub, RunningHub) else hub
    config = replace(config or WorkerConfig(), connect=(address,))
    service = WorkerService(config, app, reactor)
    service.startService()
    if wait:
        await wait_until(reactor, lambda: service.runtime.idle_connections >= config.threads)
    return service


async def wait_until(reactor: Any, predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {predicate}")
        await sleep(reactor, interval)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@dataclass
class RunningPair:
    hub: RunningHub
    worker: WorkerService

    def url(self, path: str = "/") -> str:
        return self.hub.url(path)


@contextlib.asynccontextmanager
async def running_pair(
    app: Any,
    *,
    threads: int = 1,
    hub_config: HubConfig | None = None,
    worker_config: WorkerConfig | None = None,
    reactor: Any = None,
) -> AsyncIterator[RunningPair]:
    """A hub and one worker serving ``app``, stopped (drained) on exit."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    hub = await start_hub(reactor, hub_config)
    try:
        worker = await start_worker(reactor, app, hub, replace(worker_config or WorkerConfig(), threads=threads))
        try:
            yield RunningPair(hub, worker)
        finally:
            await worker.stopService()
    finally:
        await hub.service.stopService()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for subprocess tests that need a fixed port)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Block (outside a reactor) until ``host:port`` accepts connections; TimeoutError after ``timeout``."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
