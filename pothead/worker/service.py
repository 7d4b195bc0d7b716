"""
Wiring of the worker: hub targets, slots, the thread pool, and the drain on stop.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from ..config import ConfigError, WorkerConfig
from ..listening import Listener
from ..logs import LogFormatMixin
from .polling import SlotPoller
from .runtime import WorkerRuntime
from .slots import HubTarget

_HOST_PORT = re.compile(r"\A(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:=\[\]]+)):(?P<port>\d{1,5})\Z")


def client_endpoint_description(text: str) -> str:
    """``host:port`` (the reference worker's form) -> ``tcp:host=...:port=...``; endpoint strings unchanged."""
    match = _HOST_PORT.match(text.strip())
    if match:
        host = match.group("v6") or match.group("host")
        host = host.replace(":", r"\:")
        return f"tcp:host={host}:port={match.group('port')}"
    return text


def parse_client_endpoint(reactor: Any, text: str) -> Any:
    description = client_endpoint_description(text)
    try:
        return clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"--connect: {text!r} is not a hub address ({e}); use HOST:PORT or an endpoint like "
            "tcp:host=hub.example:port=4040 or unix:path=/run/pothead-workers.sock"
        ) from None


class WorkerService(LogFormatMixin, MultiService):
    """
    A running worker: ``threads`` slots, each holding a connection to every hub.

    Stopping it (SIGTERM under twistd) retires idle connections at once, lets
    running jobs finish, then stops the thread pool.
    """

    _log = Logger(namespace="pothead.worker")

    def __init__(self, config: WorkerConfig, app: Any, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        targets = [
            HubTarget(
                client_endpoint_description(text),
                parse_client_endpoint(reactor, text),
                config.reconnect_initial,
                config.reconnect_max,
            )
            for text in config.connect
        ]
        self.runtime = WorkerRuntime(
            reactor, app, targets, threads=config.threads, keep_alive=config.keep_alive
        )
        self.poller: SlotPoller | None = None
        if config.poll_jobs:
            wait_for_slot = getattr(app, "wait_for_slot", None)
            if not callable(wait_for_slot):
                raise ConfigError(
                    f"--poll-jobs: the app {config.app} has no wait_for_slot; add e.g. "
                    "app.wait_for_slot = pothead.gating.wait_for_idle_cpus(1), or use --threads N"
                )
            self.poller = SlotPoller(self.runtime, wait_for_slot)
        self.operator_listener: Listener | None = None
        if config.metrics is not None:
            from twisted.web.server import Site

            from .. import metrics

            metrics.observe_worker(self.runtime)
            resource = metrics.operator_resource(metrics.export_registry(config.multiprocess_dir), self.readiness)
            self.operator_listener = Listener(reactor, config.metrics, Site(resource), "metrics", option="--metrics")
            self.operator_listener.setServiceParent(self)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: connected to at least one hub, and not stopping."""
        if self.runtime.stopping:
            return False, "stopping"
        connected = self.runtime.connected_hubs()
        if connected == 0:
            return False, "not connected to any hub"
        return True, f"ready: connected to {connected} of {len(self.runtime.targets)} hubs"

    def startService(self) -> None:
        super().startService()
        self.runtime.start()
        self._log.info(
            "worker starting: {slots} for app {app}, hubs {hubs}",
            slots="slots granted by the app's wait_for_slot"
            if self.poller is not None
            else f"{self.config.threads} slots",
            app=self.config.app,
            hubs=", ".join(t.description for t in self.runtime.targets),
        )
        if self.poller is not None:
            self.poller.start()
        else:
            for _ in range(self.config.threads):
                self.runtime.add_slot()

    @inlineCallbacks
    def stopService(self) -> Any:
        # halt() turns true first, so a gate blocked in wait_for_slot returns.
        poller_stopped = self.poller.stop() if self.poller is not None else None
        drained = self.runtime.stop()
        if self.config.drain_timeout is not None:
            drained.addTimeout(self.config.drain_timeout, self.reactor)
        try:
            yield drained
        except Exception:
            self._log.warn(
                "drain timeout after {timeout}s with {n} jobs still running; closing their connections",
                timeout=self.config.drain_timeout,
                n=len(self.runtime.running),
            )
            for slot in list(self.runtime.slots):
                for link in list(slot.links.values()):
                    if link.channel is not None:
                        link.channel.transport.abortConnection()
        if poller_stopped is not None:
            yield poller_stopped
        self.runtime.stop_threads()
        yield MultiService.stopService(self)
        self._log.info("worker stopped after {jobs} jobs", jobs=self.runtime.totals["job_finished"])
