"""
Wiring of the worker: hub targets, slots, the thread pool, and the drain on stop.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import clientFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ..config import ConfigError, WorkerConfig
from ..listening import Listener
from ..tls import client_tls
from ..logs import LogFormatMixin, speed_up_text_logs
from .inspect import Inspection
from .polling import SlotPoller
from .redirect import Redirects
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


#: For addresses expanded from a host name: the name, for TLS verification.
_tls_names: dict[str, str] = {}


def expand_hub_addresses(addresses: tuple[str, ...], resolve: Any = None) -> list[str]:
    """
    Every hub behind each ``--connect``: a ``HOST:PORT`` whose host name
    resolves to several addresses means several hubs (as in the original), so
    it becomes one address per hub; the name is resolved once, at start-up
    (before the reactor runs).  Endpoint strings and literal IPs are kept.
    """
    import ipaddress
    import socket

    resolve = resolve or socket.getaddrinfo
    out: list[str] = []
    for text in addresses:
        match = _HOST_PORT.match(text.strip())
        if not match or match.group("v6"):
            out.append(text)
            continue
        host, port = match.group("host"), match.group("port")
        try:
            ipaddress.ip_address(host)
            out.append(text)
            continue
        except ValueError:
            pass
        try:
            infos = resolve(host, int(port), type=socket.SOCK_STREAM)
        except OSError:
            out.append(text)  # not resolvable now: connect by name and retry
            continue
        found: list[str] = []
        for family, _, _, _, sockaddr in infos:
            address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
            if address not in found:
                found.append(address)
        if len(found) <= 1 or all(ipaddress.ip_address(a.strip("[]").rsplit(":", 1)[0].strip("[]")).is_loopback for a in found):
            # One address, or one machine (localhost -> 127.0.0.1 and ::1).
            out.append(text)
            continue
        for address in found:
            _tls_names[address] = host
            out.append(address)
    return out


def endpoint_host(description: str) -> str | None:
    """The host a ``tcp:``/``host:port`` hub address names (for TLS verification)."""
    if not description.startswith("tcp:"):
        return None
    for part in re.split(r"(?<!\\):", description[4:]):
        key, _, value = part.partition("=")
        if key == "host":
            return value.replace("\\:", ":")
    return None


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
        tls = client_tls(config.tls_ca, config.tls_cert, config.tls_key)
        targets = []
        for text in expand_hub_addresses(config.connect):
            endpoint = parse_client_endpoint(reactor, text)
            description = client_endpoint_description(text)
            if tls is not None:
                host = _tls_names.get(text) or endpoint_host(description)
                if host is None:
                    raise ConfigError(f"--tls-ca: cannot tell the hub's host name from {text!r}; use HOST:PORT")
                endpoint = tls.wrap(endpoint, host)
                description = f"tls:{description}"
            targets.append(HubTarget(description, endpoint, config.reconnect_initial, config.reconnect_max))
        self.runtime = WorkerRuntime(
            reactor,
            app,
            targets,
            threads=config.threads,
            keep_alive=config.keep_alive,
            worker_token=config.worker_token,
        )
        self.redirect_listener: Listener | None = None
        if config.redirect is not None:
            self.redirect_listener = self._redirect_listener(config, reactor)
        self.inspection: Inspection | None = None
        self.inspect_listener: Listener | None = None
        if config.inspect is not None:
            self.inspection = Inspection(self.runtime)
            self.inspect_listener = Listener(reactor, config.inspect, self.inspection.site, "inspection", option="--inspect")
            self.inspect_listener.setServiceParent(self)
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
            from .. import metrics

            metrics.observe_worker(self.runtime)
            site = metrics.operator_site(metrics.export_registry(config.multiprocess_dir), self.readiness)
            self.operator_listener = Listener(reactor, config.metrics, site, "metrics", option="--metrics")
            self.operator_listener.setServiceParent(self)

    def _redirect_listener(self, config: WorkerConfig, reactor: Any) -> Listener:
        description = config.redirect or ""
        kind = description.strip().split(":", 1)[0].lower()
        if config.redirect_url_base is None and kind == "unix":
            raise ConfigError(
                "--redirect-response: a unix socket has no address consumers can be sent to; "
                "add --redirect-url-base with the URL a proxy serves it at"
            )
        redirects = Redirects(
            reactor,
            config.redirect_expiry,
            config.redirect_url_base,
            self.runtime.emit,
            scheme="https" if kind == "ssl" else "http",
        )
        self.runtime.redirects = redirects
        listener = Listener(reactor, description, redirects.site, "redirected responses", option="--redirect-response")
        redirects.listener = listener
        listener.setServiceParent(self)
        return listener

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
        speed_up_text_logs()
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
        redirects = self.runtime.redirects
        if redirects is not None and redirects.active:
            self._log.info(
                "waiting for {parked} parked responses to be fetched or expire and {streaming} to finish streaming",
                parked=len(redirects.parked),
                streaming=len(redirects.active) - len(redirects.parked),
            )
        in_time = True
        if self.config.drain_timeout is not None:
            # Not drained.addTimeout(): runtime.stop() is a DeferredList, which
            # *succeeds* (with failures inside) when cancelled, so the timeout
            # would never be seen.
            in_time = yield _within(drained, self.config.drain_timeout, self.reactor)
        else:
            yield drained
        if not in_time:
            self._log.warn(
                "drain timeout after {timeout}s with {n} jobs still running; closing their connections",
                timeout=self.config.drain_timeout,
                n=len(self.runtime.running),
            )
            for slot in list(self.runtime.slots):
                for link in list(slot.links.values()):
                    if link.channel is not None:
                        link.channel.transport.abortConnection()
            if redirects is not None:
                # Wake the WSGI threads holding parked or streaming bodies.
                redirects.abort_all()
            # Stopping the thread pool joins the WSGI threads: give the ones
            # just cut off a moment to notice, or the join could wait on a
            # thread that waits on the reactor.
            yield _within(drained, 5.0, self.reactor)
        if poller_stopped is not None:
            yield poller_stopped
        # ThreadPool.stop() joins the WSGI threads: never on the reactor thread,
        # where a thread still writing through the reactor would deadlock it.
        yield deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.runtime.stop_threads)
        if redirects is not None:
            redirects.close_connections()
        if self.inspection is not None:
            # Fully stopped: /apocalypse watchers get their last line now.
            yield self.inspection.worker_stopped()
            self.inspection.close_connections()
        yield MultiService.stopService(self)
        self._log.info("worker stopped after {jobs} jobs", jobs=self.runtime.totals["job_finished"])


def _within(d: Deferred[Any], seconds: float, reactor: Any) -> Deferred[bool]:
    """Fires True when ``d`` fires within ``seconds``, else False then; ``d`` itself is left alone."""
    out: Deferred[bool] = Deferred()

    def late() -> None:
        if not out.called:
            out.callback(False)

    timer = reactor.callLater(seconds, late)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not out.called:
            out.callback(True)
        return result

    d.addBoth(done)
    return out
