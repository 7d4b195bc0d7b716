"""
The worker port: connections that workers open to the hub.

Each accepted connection is a :class:`WorkerConnection`, an explicit state
machine::

    HANDSHAKING ──101──▶ READY ──dispatch──▶ BUSY ──job_finished (keep-alive)──▶ READY
    (only with a worker token; see pothead.ptth)
      │                   │
      └──── lost / retired / closed ─────────────▶ CLOSED

Only READY connections are in the queue's ready pool.  The HTTP mechanics are
delegated to :class:`~pothead.hub._http11.ReverseHTTPClient`.
"""

from __future__ import annotations

import enum
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, IHandshakeListener, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from ..ptth import MAX_HEAD, SWITCHING, check_upgrade, split_head, unauthorized
from ._http11 import NotDelivered, ReverseHTTPClient, WorkerResponse

if TYPE_CHECKING:
    from .dispatch import Hub


class State(enum.Enum):
    TLS_HANDSHAKING = "tls-handshaking"
    HANDSHAKING = "handshaking"
    READY = "ready"
    BUSY = "busy"
    CLOSED = "closed"


def describe_address(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(address, "name", None)
    return f"unix:{name!r}" if name is not None else str(address)


@implementer(IHandshakeListener)
class WorkerConnection(Protocol):
    """One worker connection; the hub is the HTTP client on it."""

    _log = Logger()

    #: Seconds a new connection may take to complete the PTTH handshake.
    HANDSHAKE_TIMEOUT = 10.0

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._http = ReverseHTTPClient()
        self.state = State.CLOSED
        self.peer = "?"
        self.jobs_done = 0
        self._buffer = b""
        self._handshake_timer: Any = None
        self._tls = False

    def __repr__(self) -> str:
        return f"<WorkerConnection {self.peer} {self.state.value}>"

    # -- transport events ---------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = describe_address(self.transport.getPeer())
        if ITCPTransport.providedBy(self.transport):
            # A worker that vanishes without a FIN is found by TCP keepalive;
            # there is deliberately no idle timeout on worker connections.
            self.transport.setTcpKeepAlive(True)
            # Requests and responses are single writes: never wait for an ACK.
            self.transport.setTcpNoDelay(True)
        self._hub.worker_connected(self)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self._tls = True
            # TLS: a request written now would sit in the TLS buffer and be
            # lost (502) if the handshake fails; wait for handshakeCompleted.
            self.state = State.TLS_HANDSHAKING
            return
        self._after_transport_ready()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake with the worker succeeded."""
        if self.state is State.TLS_HANDSHAKING:
            self._after_transport_ready()

    def _after_transport_ready(self) -> None:
        if self._hub.config.worker_token is not None:
            self.state = State.HANDSHAKING
            self._handshake_timer = self._hub.clock.callLater(self.HANDSHAKE_TIMEOUT, self._handshake_timeout)
            return
        self._start_http()

    def _start_http(self) -> None:
        self._http.attach(self.transport)
        self._become_ready()

    def _handshake(self, data: bytes) -> None:
        self._buffer += data
        token = self._hub.config.worker_token
        assert token is not None
        parts = split_head(self._buffer)
        if parts is None:
            if len(self._buffer) > MAX_HEAD:
                self._refuse("handshake too long")
            return
        head, rest = parts
        self._buffer = b""
        why = check_upgrade(head, token)
        if why is None and rest:
            why = "sent data before the upgrade was accepted"
        if why is not None:
            self._refuse(why)
            return
        self._cancel_handshake_timer()
        self.transport.write(SWITCHING)
        self._log.debug("worker {peer} authenticated", peer=self.peer)
        self._start_http()

    def _refuse(self, why: str) -> None:
        self._cancel_handshake_timer()
        self._hub.emit("worker_refused", reason=why)
        self._log.warn("refused worker connection from {peer}: {why}", peer=self.peer, why=why)
        self.state = State.CLOSED
        self.transport.write(unauthorized(why if why != "wrong token" else "invalid token"))
        self.transport.loseConnection()

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.state is State.HANDSHAKING:
            self._refuse(f"no PTTH upgrade within {self.HANDSHAKE_TIMEOUT:g}s")

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            if self._handshake_timer.active():
                self._handshake_timer.cancel()
            self._handshake_timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.TLS_HANDSHAKING:
            # Application data before our handshake completed cannot happen
            # with TLS (it is delivered after); be strict anyway.
            self.transport.loseConnection()
            return
        if self.state is State.HANDSHAKING:
            self._handshake(data)
            return
        if self.state is State.CLOSED:
            return
        if self.state is State.READY:
            # Unsolicited bytes on an idle connection: the worker is retiring
            # it (our worker sends a 503 + Pothead-Requeue before closing).
            self._log.debug("worker {peer} retired an idle connection", peer=self.peer)
            self._leave_pool()
            self.transport.loseConnection()
            return
        self._http.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._cancel_handshake_timer()
        previous = self.state
        self.state = State.CLOSED
        if previous is State.READY:
            self._hub.queue.connection_gone(self)
        if self._http.attached:
            self._http.connectionLost(reason)
        self._hub.worker_disconnected(self)

    # -- used by jobs -------------------------------------------------------

    def dispatch(
        self,
        method: bytes,
        uri: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
    ) -> Deferred[WorkerResponse]:
        """Send one job's request; the connection is BUSY until :meth:`job_finished`."""
        if self.state is not State.READY:
            return fail(NotDelivered(f"connection is {self.state.value}"))
        gone = self._peer_gone()
        if gone is not None:
            # Its close (or retire notice) is already here, not yet read:
            # writing the job would turn a safe requeue into a 502.
            self._leave_pool()
            return fail(NotDelivered(gone))
        self.state = State.BUSY
        return self._http.send(method, uri, headers, body)

    def job_finished(self) -> None:
        """The job's response is over: reuse the connection if the worker allowed it."""
        if self.state is not State.BUSY:
            return
        self.jobs_done += 1
        if self._http.reusable and not self._hub.draining_workers:
            self._become_ready()
        else:
            self.state = State.CLOSED
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now (consumer gone mid-job, or a broken worker)."""
        self._leave_pool()
        self.transport.abortConnection()

    def close(self) -> None:
        """Close an idle connection (hub shutting down)."""
        self._leave_pool()
        self.transport.loseConnection()

    # -- internals ----------------------------------------------------------

    def _peer_gone(self) -> str | None:
        """
        Whether the worker already closed (FIN or RST) or spoke on this idle
        connection in bytes the reactor has not read yet -- e.g. a worker
        killed with several connections: the reset of one is handled and its
        job requeued while the FIN of the next is still in the socket.  One
        non-blocking ``MSG_PEEK`` per dispatch; plain TCP only (TLS records
        can be pending without meaning anything).
        """
        if self._tls:
            return None
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if not isinstance(sock, socket.socket):
            return None
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            return f"worker reset the idle connection ({e.strerror or e})"
        if not data:
            return "worker closed the idle connection"
        return "worker is retiring the idle connection"

    def _become_ready(self) -> None:
        self.state = State.READY
        self._hub.queue.connection_ready(self)

    def _leave_pool(self) -> None:
        if self.state is State.READY:
            self._hub.queue.connection_gone(self)
        self.state = State.CLOSED


class WorkerFactory(Factory):
    """Builds a :class:`WorkerConnection` for every accepted worker."""

    noisy = False

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def buildProtocol(self, addr: IAddress) -> WorkerConnection:
        return WorkerConnection(self._hub)
