"""
systemd service notifications (``sd_notify(3)``) with no compiled dependency.

The protocol is one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace), as
in Synapse's inline ``sdnotify()``.  :class:`SystemdNotifier` is a Twisted
service that tells systemd, for a ``Type=notify`` unit:

- ``READY=1`` once the daemon is really serving: the hub when every listener is
  bound (:meth:`HubService.when_listening`), the worker when its first
  connection to a hub is up or its first attempt failed and is being retried;
- ``STOPPING=1`` when shutdown begins, *before* the drain (a "before shutdown"
  system event trigger registered when the notifier starts, which is before
  twistd registers the application's ``stopService``);
- ``STATUS=`` a one-line summary, re-evaluated every few seconds and sent when
  it changes (``systemctl status`` shows it);
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (``WatchdogSec=`` in the unit), from
  the reactor loop, so a wedged reactor gets the process restarted.  Pings go
  on through the drain until the daemon exits.

Without ``$NOTIFY_SOCKET`` the notifier does nothing.  A send that fails is
logged once and never stops the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Seconds between evaluations of the status line.
STATUS_INTERVAL = 2.0


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The ``AF_UNIX`` address in ``$NOTIFY_SOCKET`` (abstract names as ``"\\0name"``), or None."""
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a form we do not speak (systemd 254+ also allows vsock:)


class DatagramSender:
    """Sends each message as one datagram to ``address`` (``AF_UNIX``, ``SOCK_DGRAM``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket: socket.socket | None = None

    def __call__(self, message: bytes) -> None:
        if self._socket is None:
            # Not inherited by subprocesses the WSGI app may start (Python's
            # default).  Non-blocking: a stalled systemd must not stall the
            # reactor; a full queue is a send error instead.
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        self._socket.sendto(message, self.address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, if it is meant for ``pid``."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1e6 / 2


class SystemdNotifier(Service):
    """
    Keeps systemd informed of a daemon's life cycle (see the module docstring).

    ``ready`` returns a Deferred that fires when the daemon serves; ``status``
    returns the one-line summary.  ``send`` (a callable taking the datagram
    bytes) and ``clock`` are injectable for tests; by default the datagram
    goes to ``$NOTIFY_SOCKET`` and timers run on ``reactor``.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        ready: Callable[[], Deferred[Any]],
        status: Callable[[], str],
        reactor: IReactorCore,
        clock: IReactorTime | None = None,
        environ: Mapping[str, str] | None = None,
        send: Callable[[bytes], None] | None = None,
        pid: int | None = None,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._ready_source = ready
        self._status_source = status
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._status_interval = status_interval
        self._sender: DatagramSender | None = None
        if send is None:
            address = notify_address(environ)
            if address is not None:
                self._sender = DatagramSender(address)
                send = self._sender
        self._send = send
        self.watchdog_interval = watchdog_interval(environ, os.getpid() if pid is None else pid)
        self.ready_sent = False
        self.stopping_sent = False
        self._last_status: str | None = None
        self._send_failed = False
        self._trigger: Any = None
        self._status_loop: LoopingCall | None = None
        self._watchdog_loop: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        """False when there is nobody to notify (``$NOTIFY_SOCKET`` unset)."""
        return self._send is not None

    # -- life cycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self.enabled:
            return
        # Registered now, while twistd's startApplication (or foreground.run)
        # starts the services: before the trigger that stops them, so systemd
        # hears STOPPING=1 before the drain begins.
        self._trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self._shutdown_begins)
        if self.watchdog_interval is not None:
            self._watchdog_loop = LoopingCall(self.notify, "WATCHDOG=1")
            self._watchdog_loop.clock = self._clock
            self._watchdog_loop.start(self.watchdog_interval, now=True)
        # Asked before the first status line: a daemon already bound (twistd
        # binds in privilegedStartService) says READY=1 with its status at once.
        self._ready_source().addCallbacks(self._ready, self._not_ready)
        self._status_loop = LoopingCall(self._refresh_status)
        self._status_loop.clock = self._clock
        self._status_loop.start(self._status_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if not self.enabled:
            return
        self.stopping()  # in case stopService was called without a reactor shutdown
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        for loop in (self._status_loop, self._watchdog_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._status_loop = self._watchdog_loop = None
        if self._sender is not None:
            self._sender.close()

    # -- notifications ---------------------------------------------------------

    def notify(self, *lines: str) -> None:
        """Send ``lines`` as one datagram; failures are logged (once), never raised."""
        if self._send is None:
            return
        try:
            self._send("\n".join(lines).encode("utf-8", "replace"))
        except Exception as e:
            if not self._send_failed:
                self._send_failed = True
                self._log.warn("cannot notify systemd ({lines}): {error}", lines=lines[0], error=e)

    def stopping(self) -> None:
        """``STOPPING=1``, once: the drain is about to begin."""
        if self.stopping_sent or not self.enabled:
            return
        self.stopping_sent = True
        line = self._status_line()
        self._last_status = line
        self.notify("STOPPING=1", "STATUS=" + line)

    def _shutdown_begins(self) -> None:
        self._trigger = None  # fired: removing it later would warn
        self.stopping()

    def _ready(self, _: object) -> None:
        if self.stopping_sent or not self.running:
            return
        self.ready_sent = True
        line = self._status_line()
        self._last_status = line
        self.notify("READY=1", "STATUS=" + line)

    def _not_ready(self, failure: Failure) -> None:
        # The daemon is about to exit (a listener could not bind); say why.
        while failure.check(FirstError):
            failure = failure.value.subFailure
        self.notify("STATUS=failed to start: " + failure.getErrorMessage().replace("\n", " "))

    def _status_line(self) -> str:
        try:
            line = self._status_source()
        except Exception as e:  # a status bug must not take the daemon down
            line = f"status unavailable ({e})"
        line = " ".join(line.split())
        if self.stopping_sent and not line.startswith(("stopping", "draining")):
            line = "stopping: " + line
        elif not self.ready_sent and not self.stopping_sent:
            line = "starting: " + line
        return line

    def _refresh_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notify("STATUS=" + line)


# -- what the hub and the worker report ------------------------------------------


def hub_status(service: Any) -> str:
    """``HubService`` -> e.g. ``3 queued, 2 in flight, 4 idle worker connections of 6, 120 requests``."""
    hub = service.hub
    queued = hub.queue.waiting
    line = (
        f"{queued} queued, {max(0, len(hub.jobs) - queued)} in flight, "
        f"{hub.queue.ready} idle worker connections of {len(hub.connections)}, "
        f"{hub.totals['request']} requests"
    )
    return ("draining: " + line) if hub.draining else line


def worker_status(service: Any) -> str:
    """``WorkerService`` -> e.g. ``1 busy, 3 idle slots, 2 of 2 hubs connected, 57 jobs``."""
    runtime = service.runtime
    busy = sum(1 for slot in runtime.slots if slot.request is not None)
    line = (
        f"{busy} busy, {len(runtime.slots) - busy} idle slots, "
        f"{runtime.connected_hubs()} of {len(runtime.targets)} hubs connected, "
        f"{runtime.totals['job_finished']} jobs"
    )
    return ("stopping: " + line) if runtime.stopping else line


def worker_ready(service: Any) -> Deferred[Any]:
    """
    Fires when the worker's own listeners (metrics, redirected responses,
    inspection) are bound and its first connection to a hub is up, or its
    first attempt failed and it is retrying (an unreachable hub must not hold
    the unit in "activating": the worker is doing what it should).  A gated
    worker (``--poll-jobs``) may wait on its gate indefinitely before it
    connects at all, so for it the listeners are enough.
    """
    from .listening import Listener

    runtime = service.runtime
    waits: list[Deferred[Any]] = [
        child.when_listening() for child in getattr(service, "services", ()) if isinstance(child, Listener)
    ]
    if getattr(service, "poller", None) is None and not (runtime.totals["connected"] or runtime.totals["connect_failed"]):
        tried: Deferred[None] = Deferred()

        def observe(event: str, fields: dict[str, object]) -> None:
            if event in ("connected", "connect_failed") and not tried.called:
                runtime.observers.remove(observe)
                tried.callback(None)

        runtime.observers.append(observe)
        waits.append(tried)
    return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)


def notifier_for(service: IService, reactor: Any, **kwargs: Any) -> SystemdNotifier:
    """A notifier reporting on a ``HubService`` or ``WorkerService``."""
    if hasattr(service, "hub"):
        return SystemdNotifier(
            ready=service.when_listening,  # type: ignore[attr-defined]
            status=lambda: hub_status(service),
            reactor=reactor,
            **kwargs,
        )
    if hasattr(service, "runtime"):
        return SystemdNotifier(
            ready=lambda: worker_ready(service), status=lambda: worker_status(service), reactor=reactor, **kwargs
        )
    raise TypeError(f"no systemd status for {service!r}")


def attach_notifier(service: IService, reactor: Any, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
    """
    Make a notifier a child of ``service`` when ``$NOTIFY_SOCKET`` is set.

    As a child it starts after the listeners (so ``when_listening`` is
    meaningful) and stops after the parent's drain (so watchdog pings and
    status lines continue through it).
    """
    environ = os.environ if environ is None else environ
    if notify_address(environ) is None:
        return None
    notifier = notifier_for(service, reactor, environ=environ)
    notifier.setServiceParent(service)
    return notifier


__all__ = [
    "DatagramSender",
    "SystemdNotifier",
    "attach_notifier",
    "hub_status",
    "notifier_for",
    "notify_address",
    "watchdog_interval",
    "worker_ready",
    "worker_status",
]
