"""
The worker's concurrency: slots, and their connections (links) to hubs.

A :class:`Slot` is one unit of concurrency -- one job at a time, one WSGI
thread.  While idle it holds one connection to *every* hub, so whichever hub
has work first gets it (one central queue per hub, and no hub starves while
the slot sits idle on another).  When a job arrives on one link the slot
retires its other links (without losing a request that may be crossing on
the wire, see :mod:`pothead.worker.channel`); when the job ends it reconnects
to the hubs it left.

States::

    IDLE ──job arrives on a link──▶ BUSY ──job over──▶ IDLE
      └──────────── stop() ─────────────▶ STOPPING ──no links left──▶ STOPPED

:class:`HubTarget` is one hub address with its reconnect backoff, shared by
every slot so that an unreachable hub is logged once and retried with one
backoff, not in a tight loop per slot.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .channel import JobRequest, ReverseChannel, ReverseSite
from .handshake import Handshake, HandshakeRefused

if TYPE_CHECKING:
    from .runtime import WorkerRuntime


class HubTarget:
    """One hub to connect to: its endpoint and its reconnect backoff."""

    _log = Logger()

    def __init__(self, description: str, endpoint: Any, initial: float, maximum: float) -> None:
        self.description = description
        self.endpoint = endpoint
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.ever_connected = False
        self.connections = 0

    def delay(self) -> float:
        """Seconds to wait before the next attempt: 0 while the hub is healthy."""
        if self.failures == 0:
            return 0.0
        base = min(self.maximum, self.initial * (2 ** min(self.failures - 1, 30)))
        return base * random.uniform(0.8, 1.2)

    def succeeded(self) -> None:
        if self.failures:
            self._log.info(
                "connected to hub {hub} again after {failures} failed attempts",
                hub=self.description,
                failures=self.failures,
            )
        elif not self.ever_connected:
            self._log.info("connected to hub {hub}", hub=self.description)
        self.failures = 0
        self.ever_connected = True

    def failed(self, reason: Failure) -> None:
        self.failures += 1
        if self.failures == 1:
            self._log.warn(
                "cannot connect to hub {hub}: {error}; retrying with backoff up to {maximum}s",
                hub=self.description,
                error=reason.getErrorMessage(),
                maximum=self.maximum,
            )


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: Link, site: ReverseSite) -> None:
        self._link = link
        self._site = site

    def buildProtocol(self, addr: Any) -> Protocol:
        channel: ReverseChannel = self._site.buildProtocol(addr)
        channel.link = self._link
        token = self._link.slot.runtime.worker_token
        if token is None:
            return channel
        # Authenticated hubs: the channel sees the connection only after 101.
        return Handshake(channel, token, self._link.target.description, self._link.handshake_failed)


class LinkState(enum.Enum):
    WAITING = "waiting"  # backoff before connecting
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


class Link:
    """One slot's connection (or connection attempt) to one hub."""

    def __init__(self, slot: Slot, target: HubTarget) -> None:
        self.slot = slot
        self.target = target
        self.state = LinkState.WAITING
        self.channel: ReverseChannel | None = None
        self._timer: IDelayedCall | None = None
        self._attempt: Deferred[Any] | None = None

    def start(self, delay: float) -> None:
        self._timer = self.slot.runtime.reactor.callLater(delay, self._connect)

    def _connect(self) -> None:
        self._timer = None
        self.state = LinkState.CONNECTING
        self.slot.runtime.emit("connect_attempt", hub=self.target.description)
        attempt = self.target.endpoint.connect(_LinkFactory(self, self.slot.runtime.site))
        self._attempt = attempt
        attempt.addErrback(self._connect_failed)

    def _connect_failed(self, reason: Failure) -> None:
        self._attempt = None
        if self.state is not LinkState.CONNECTING:
            return
        self.state = LinkState.CLOSED
        if not reason.check(CancelledError, ConnectingCancelledError):
            self.target.failed(reason)
            self.slot.runtime.emit("connect_failed", hub=self.target.description)
        self.slot.link_closed(self)

    def handshake_failed(self, why: str) -> None:
        """The hub refused our upgrade (or closed during it): a failed attempt."""
        self._attempt = None
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self.target.failed(Failure(HandshakeRefused(f"PTTH upgrade refused: {why}")))
        self.slot.runtime.emit("connect_failed", hub=self.target.description)
        self.slot.link_closed(self)

    # -- called by the ReverseChannel ----------------------------------------

    def connected(self, channel: ReverseChannel) -> None:
        self._attempt = None
        self.channel = channel
        self.state = LinkState.OPEN
        if not isinstance(channel.transport, TLSMemoryBIOProtocol):
            self.target.succeeded()  # with TLS: once the hub's certificate is accepted
        self.target.connections += 1
        self.slot.runtime.emit("connected", hub=self.target.description)
        self.slot.link_open(self)

    def tls_verified(self) -> None:
        self.target.succeeded()

    def lost(self, channel: ReverseChannel, reason: Failure) -> None:
        self.state = LinkState.CLOSED
        self.target.connections -= 1
        if isinstance(channel.transport, TLSMemoryBIOProtocol) and not channel.tls_verified:
            # The TCP connect worked but TLS did not (certificate refused):
            # a failed attempt, with backoff, not a tight reconnect loop.
            self.target.failed(reason)
            self.slot.runtime.emit("connect_failed", hub=self.target.description)
        self.slot.link_closed(self)

    def job_arrived(self, request: JobRequest) -> bool:
        return self.slot.job_arrived(self, request)

    def keep_alive_after_job(self) -> bool:
        return self.slot.keep_alive_after_job()

    def job_over(self, request: JobRequest, completed: bool) -> None:
        self.slot.job_over(self, request, completed)

    # -- called by the slot ---------------------------------------------------

    def retire(self) -> None:
        """Stop this link without losing a request that may be on its way."""
        if self.state is LinkState.WAITING:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self.state = LinkState.CLOSED
            self.slot.link_closed(self)
        elif self.state is LinkState.CONNECTING:
            if self._attempt is not None:
                self._attempt.cancel()
            # If the connection completes anyway, link_open retires it.
        elif self.state is LinkState.OPEN and self.channel is not None:
            self.channel.retire()

    @property
    def idle(self) -> bool:
        return self.state is LinkState.OPEN and self.channel is not None and self.channel.idle


class SlotState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Slot:
    """One job at a time; idle links to every hub while waiting for it."""

    _log = Logger()

    def __init__(self, runtime: WorkerRuntime, number: int, grant: Any = None, *, gated: bool = False) -> None:
        self.runtime = runtime
        self.number = number
        #: A gated slot (``--poll-jobs``) takes one job, then releases its grant and ends.
        self.gated = gated
        #: The gate's grant (may be None: the contract allows any object).
        self.grant = grant
        self._released = False
        self.state = SlotState.IDLE
        self.links: dict[HubTarget, Link] = {}
        self.busy_link: Link | None = None
        self.request: JobRequest | None = None
        self.jobs = 0
        self._stopped: Deferred[None] | None = None
        #: Called once when the slot has stopped (gated slots end after one job).
        self.on_stopped: Callable[[Slot], None] | None = None

    def __repr__(self) -> str:
        return f"<Slot {self.number} {self.state.value} links={len(self.links)}>"

    def start(self) -> None:
        for target in self.runtime.targets:
            self._open(target)

    def _open(self, target: HubTarget) -> None:
        if self.state is not SlotState.IDLE or target in self.links:
            return
        link = Link(self, target)
        self.links[target] = link
        link.start(target.delay())

    # -- link events ----------------------------------------------------------

    def link_open(self, link: Link) -> None:
        if self.state is not SlotState.IDLE or self.links.get(link.target) is not link:
            link.retire()

    def link_closed(self, link: Link) -> None:
        if self.links.get(link.target) is link:
            del self.links[link.target]
        if link is self.busy_link and self.state is SlotState.BUSY:
            # The job's connection died before its request finished: the
            # request's own connectionLost reports the job as over.
            pass
        if self.state is SlotState.IDLE:
            self._open(link.target)
        elif self.state is SlotState.STOPPING:
            self._maybe_stopped()

    # -- job events -----------------------------------------------------------

    def job_arrived(self, link: Link, request: JobRequest) -> bool:
        if self.state is not SlotState.IDLE or self.runtime.stopping:
            return False
        self.state = SlotState.BUSY
        self.busy_link = link
        self.request = request
        for other in list(self.links.values()):
            if other is not link:
                other.retire()
        self.runtime.job_started(self, request, link.target)
        return True

    def keep_alive_after_job(self) -> bool:
        return not self.gated and self.runtime.keep_alive and not self.runtime.stopping

    def job_over(self, link: Link, request: JobRequest, completed: bool) -> None:
        if request is not self.request:
            return
        self.request = None
        self.busy_link = None
        self.jobs += 1
        self.runtime.job_finished(self, request, link.target, completed)
        if self.gated:
            # A gate's grant covers one job: release it now (the gate may
            # start another job) and end the slot.
            self.release_grant()
            self._begin_stop()
        elif self.runtime.stopping:
            self._begin_stop()
        else:
            self.state = SlotState.IDLE
            for target in self.runtime.targets:
                self._open(target)

    def prepare_environ(self, environ: dict[str, Any]) -> None:
        """Runs in the WSGI thread before the app: the gate learns the job started."""
        received = getattr(self.grant, "request_received", None)
        if received is not None:
            received(environ)

    def release_grant(self) -> None:
        grant = self.grant
        if self.gated and not self._released:
            self._released = True
            from .polling import release

            release(grant)

    # -- stopping -------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Retire idle links now; a running job finishes first.  Fires when no link is left."""
        if self._stopped is None:
            self._stopped = Deferred()
        done = self._stopped
        if self.state is SlotState.IDLE:
            self._begin_stop()
        elif self.state is SlotState.STOPPED:
            return succeed(None)
        return _chained(done)

    def _begin_stop(self) -> None:
        self.state = SlotState.STOPPING
        for link in list(self.links.values()):
            link.retire()
        self._maybe_stopped()

    def _maybe_stopped(self) -> None:
        if self.state is SlotState.STOPPING and not self.links:
            self.state = SlotState.STOPPED
            self.release_grant()
            if self.on_stopped is not None:
                self.on_stopped(self)
            if self._stopped is not None:
                stopped, self._stopped = self._stopped, None
                stopped.callback(None)


def _chained(d: Deferred[None]) -> Deferred[None]:
    out: Deferred[None] = Deferred()

    def relay(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(relay)
    return out
