"""
Wiring of the hub: listeners for consumers and workers, and the drain on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import HubConfig
from ..listening import Listener
from ..logs import LogFormatMixin, speed_up_text_logs
from .front import ConsumerSite
from .dispatch import Hub
from .workers import WorkerFactory


class HubService(LogFormatMixin, MultiService):
    """
    A running hub.

    Stopping it (SIGTERM under twistd) drains: the consumer listeners close,
    requests still arriving on open consumer connections get 503, queued and
    in-flight jobs get up to ``drain_timeout`` seconds to finish; then what is
    left is answered 503 (queued) or aborted (in flight), and the worker
    connections close.
    """

    _log = Logger()

    def __init__(self, config: HubConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor: IReactorTime = reactor
        self.hub = Hub(config, reactor)
        self.consumer_site = ConsumerSite(self.hub)
        self.worker_factory = WorkerFactory(self.hub)
        self.consumer_listeners = [
            Listener(reactor, d, self.consumer_site, "consumers", option="--listen") for d in config.listen
        ]
        self.worker_listeners = [
            Listener(reactor, d, self.worker_factory, "workers", option="--workers") for d in config.workers
        ]
        for listener in self.consumer_listeners + self.worker_listeners:
            listener.setServiceParent(self)
        self.operator_listener: Listener | None = None
        if config.metrics is not None:
            from .. import metrics

            metrics.observe_hub(self.hub)
            site = metrics.operator_site(metrics.export_registry(config.multiprocess_dir), self.readiness)
            self.operator_listener = Listener(reactor, config.metrics, site, "metrics", option="--metrics")
            self.operator_listener.setServiceParent(self)
        self.admin_listener: Listener | None = None
        if config.admin is not None:
            from .admin import admin_site

            # Stays up through the drain: /status shows it progress.
            self.admin_listener = Listener(reactor, config.admin, admin_site(self.hub), "admin", option="--admin")
            self.admin_listener.setServiceParent(self)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: listening for consumers and workers, and not draining."""
        if self.hub.draining:
            return False, "draining"
        unbound = [l.description for l in self.consumer_listeners + self.worker_listeners if l.port is None]
        if unbound:
            return False, "not listening on " + ", ".join(unbound)
        return True, f"ready: {self.hub.queue.waiting} queued, {self.hub.queue.ready} worker connections ready"

    def startService(self) -> None:
        super().startService()
        speed_up_text_logs()
        self._log.info(
            "hub starting: consumers on {listen}, workers on {workers}, queue timeout {qt}, max queue {mq}, "
            "max body {mb} bytes",
            listen=", ".join(self.config.listen),
            workers=", ".join(self.config.workers),
            qt=f"{self.config.queue_timeout}s" if self.config.queue_timeout else "none",
            mq=self.config.max_queue if self.config.max_queue is not None else "unbounded",
            mb=self.config.max_body,
        )

    def when_listening(self) -> Deferred[Any]:
        """Fires once every listener is bound (fails if one cannot bind)."""
        listeners = self.consumer_listeners + self.worker_listeners
        if self.operator_listener is not None:
            listeners.append(self.operator_listener)
        if self.admin_listener is not None:
            listeners.append(self.admin_listener)
        return DeferredList(
            [listener.when_listening() for listener in listeners],
            fireOnOneErrback=True,
            consumeErrors=True,
        )

    @inlineCallbacks
    def stopService(self) -> Any:
        hub = self.hub
        hub.draining = True
        self._log.info(
            "hub draining: {queued} queued and {jobs} jobs in total; waiting up to {timeout}s",
            queued=hub.queue.waiting,
            jobs=len(hub.jobs),
            timeout=self.config.drain_timeout,
        )
        yield DeferredList([listener.stop_listening() for listener in self.consumer_listeners])
        idle = hub.when_idle()
        if hub.jobs:
            idle.addTimeout(self.config.drain_timeout, self.reactor)
            try:
                yield idle
            except Exception:
                self._log.warn(
                    "drain timeout after {timeout}s: answering {queued} queued jobs with 503 and aborting {busy} in flight",
                    timeout=self.config.drain_timeout,
                    queued=hub.queue.waiting,
                    busy=len(hub.jobs) - hub.queue.waiting,
                )
                for job in list(hub.jobs):
                    job.give_up()
        # Let the last responses reach their consumers before the reactor stops.
        yield self.consumer_site.close_connections(self.reactor, grace=2.0)
        hub.draining_workers = True
        for connection in hub.queue.take_ready():
            connection.close()
        for connection in list(hub.connections):
            connection.abort()
        hub.stop_watching_stalls()
        yield MultiService.stopService(self)
        self._log.info("hub stopped")
