"""
``--redirect-response``: large ``200`` bodies go straight from the worker to
the consumer instead of through the hub.

When the app starts a ``200`` response, the job's WSGI thread *parks* it -- the
status, the headers and the still running body iterator -- under a random
single-use key, and the hub gets ``303 See Other`` with ``Location:
<base>/<key>``.  The consumer follows the redirect to the worker's redirect
listener; the same WSGI thread then pulls the app's iterator and writes each
chunk to that consumer, one chunk at a time, only when the connection can take
it (a :class:`~pothead.worker.wsgi.Flow`, as on the hub connection).  Nothing
of the body is read before the consumer asks for it, so the worker's memory
does not grow with the body, and a slow consumer slows the app down.

A parked response lives through these states (one :class:`ParkedResponse`)::

    PARKED ──consumer fetches the key──▶ STREAMING ──last byte / consumer left / app failed──▶ DONE
      └──────── --redirect-expiry passed (or the drain gave up) ──────────────────────────────▶ DONE

and only when it is DONE -- the WSGI thread has let go of the app's iterator
and called its ``close()`` -- does the job end: its slot stays busy, its WSGI
thread and (``--poll-jobs``) its gate grant stay taken until then, so
concurrency limits stay true.  The hub connection that carried the request is
closed after the ``303`` (it cannot be handed back to the hub as "ready" while
the slot is still busy); the slot reconnects when the job is over.

Keys are ``secrets.token_urlsafe(24)`` (192 bits); a key works once.  A second
fetch, an unknown key or an expired one gets ``410 Gone``.  Keys never appear
in logs or in the inspection view: anyone holding one can fetch the body.

Stopping (SIGTERM): no new response is parked (they go through the hub as
usual); the worker's drain waits for parked ones to be fetched or to expire
and for streams to finish, because their slots are still busy.
"""

from __future__ import annotations

import enum
import itertools
import queue
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import blockingCallFromThread
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..headers import is_hop_by_hop
from .wsgi import Flow

if TYPE_CHECKING:
    from ..listening import Listener
    from .channel import JobRequest

_log = Logger(namespace="pothead.worker.redirect")

#: Bytes of randomness in a key (192 bits; the issue asks for at least 128).
KEY_BYTES = 24

GONE_BODY = b"410 Gone: this response was already fetched, has expired, or never existed\n"


class RedirectState(enum.Enum):
    PARKED = "parked"
    STREAMING = "streaming"
    DONE = "done"


class ParkedResponse:
    """
    One parked response, shared by the reactor and the job's WSGI thread.

    The reactor owns every attribute except ``_handoff``, a thread-safe queue
    through which it tells the waiting WSGI thread what became of the key
    (``"claimed"``, ``"expired"``).  ``done`` fires in the reactor, with the
    outcome (``sent``, ``expired``, ``abandoned``, ``failed``), once the WSGI
    thread has closed the app's iterator.
    """

    def __init__(
        self, store: Redirects, key: str, request_id: str, status: str, headers: list[tuple[str, str]], now: float
    ) -> None:
        self.store = store
        self.key = key
        self.request_id = request_id
        self.status = status
        self.headers = headers
        self.parked_at = now
        self.expires_at = now + store.expiry
        self.claimed_at: float | None = None
        self.state = RedirectState.PARKED
        self.outcome: str | None = None
        self.bytes_sent = 0
        self.request: Request | None = None
        self.flow: Flow | None = None
        self.timer: IDelayedCall | None = None
        self.done: Deferred[str] = Deferred()
        self._handoff: queue.SimpleQueue[str] = queue.SimpleQueue()

    def __repr__(self) -> str:
        return f"<ParkedResponse {self.request_id} {self.state.value}>"

    # -- reactor thread ---------------------------------------------------------

    def _deliver(self, message: str) -> None:
        self._handoff.put(message)

    def _write(self, data: bytes) -> bool:
        """Write one chunk to the consumer; False once it is gone."""
        request = self.request
        flow = self.flow
        if request is None or flow is None or flow.stopped or request.finished or request._disconnected:
            return False
        request.write(data)
        self.bytes_sent += len(data)
        return True

    def _finish(self) -> None:
        request = self.request
        if request is None or request.finished or request._disconnected:
            self._set_outcome("abandoned")
            return
        request.unregisterProducer()
        request.finish()
        self._set_outcome("sent")

    def _fail(self) -> None:
        """The app raised mid-body: cut the connection so the consumer sees a truncated body."""
        self._set_outcome("failed")
        request = self.request
        if request is not None and not request._disconnected and request.channel is not None:
            transport: Any = request.channel.transport
            if transport is not None:
                transport.abortConnection()

    def _consumer_gone(self, reason: Failure) -> None:
        self._set_outcome("abandoned")
        if self.flow is not None:
            self.flow.stopProducing()  # wakes the WSGI thread if it waits for writability

    def _set_outcome(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome

    # -- WSGI thread ------------------------------------------------------------

    def _await_claim(self) -> str:
        # The reactor always answers (claim or expiry timer); the deadline only
        # guards against a reactor that has stopped under us.
        deadline = time.monotonic() + self.store.expiry + 60.0
        while True:
            try:
                return self._handoff.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    return "expired"

    def run(self, first: bytes | None, rest: Iterator[bytes]) -> None:
        """Wait for the consumer, then stream ``first`` and ``rest`` to it (WSGI thread)."""
        if self._await_claim() != "claimed":
            return
        reactor = self.store.reactor
        flow = self.flow
        assert flow is not None
        chunks = itertools.chain([first] if first else [], rest)
        try:
            for data in chunks:
                if data:
                    if not blockingCallFromThread(reactor, self._write, data):
                        return
                    flow.wait()
                if flow.stopped:
                    return
            blockingCallFromThread(reactor, self._finish)
        except Exception:
            _log.failure("[{request_id}] application error while streaming a redirected body", request_id=self.request_id)
            reactor.callFromThread(self._fail)


class Redirects:
    """
    Every parked and streaming response of one worker, and the resource that
    serves them on the redirect listener.

    ``active`` holds each response from parking until its job let go of it
    (``done``).  Runs in the reactor thread except where noted.
    """

    def __init__(
        self,
        reactor: Any,
        expiry: float,
        url_base: str | None,
        emit: Callable[..., None],
        *,
        scheme: str = "http",
    ) -> None:
        self.reactor = reactor
        self.expiry = expiry
        self.url_base = url_base
        self.scheme = scheme
        self.emit = emit
        self.listener: Listener | None = None
        #: False once the worker stops: new 200s go through the hub.
        self.accepting = True
        self.parked: dict[str, ParkedResponse] = {}
        self.active: set[ParkedResponse] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self.site = RedirectSite(RedirectResource(self))

    # -- parking (called from the WSGI thread through blockingCallFromThread) ---

    def location(self, hub_request: JobRequest, key: str) -> str | None:
        if self.url_base is not None:
            return f"{self.url_base}/{key}"
        port = self.listener.port if self.listener is not None else None
        channel = hub_request.channel
        if port is None or channel is None or channel.transport is None:
            return None
        number = getattr(port.getHost(), "port", None)
        if number is None:
            return None
        # The address this worker uses to reach the hub is one consumers that
        # reach the hub can most likely reach too.
        host = getattr(channel.transport.getHost(), "host", None) or socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{number}/{key}"

    def park(
        self, hub_request: JobRequest, status: str, headers: list[tuple[str, str]], request_id: str
    ) -> ParkedResponse | None:
        """Park a 200 response and answer the hub 303; None when it must go through the hub instead."""
        if not self.accepting or hub_request.finished or hub_request._disconnected:
            return None
        key = secrets.token_urlsafe(KEY_BYTES)
        location = self.location(hub_request, key)
        if location is None:
            return None
        parked = ParkedResponse(self, key, request_id, status, headers, self.reactor.seconds())
        self.parked[key] = parked
        self.active.add(parked)
        parked.timer = self.reactor.callLater(self.expiry, self._expire, parked)
        hub_request.send_redirect(parked, location.encode("ascii"))
        self.emit("redirect_parked", request_id=request_id)
        _log.info(
            "[{request_id}] response parked for redirect; expires in {expiry}s", request_id=request_id, expiry=self.expiry
        )
        return parked

    def _expire(self, parked: ParkedResponse, outcome: str = "expired") -> None:
        if parked.timer is not None and parked.timer.active():
            parked.timer.cancel()  # called early, by abort_all()
        parked.timer = None
        if self.parked.pop(parked.key, None) is None:
            return
        parked._set_outcome(outcome)
        self.emit("redirect_expired", request_id=parked.request_id)
        _log.info(
            "[{request_id}] parked response {what} after {age:.1f}s; closing it",
            request_id=parked.request_id,
            what="expired unclaimed" if outcome == "expired" else "cancelled by the drain",
            age=self.reactor.seconds() - parked.parked_at,
        )
        parked._deliver("expired")

    def released(self, parked: ParkedResponse) -> None:
        """The WSGI thread let go of the parked iterator (it called close())."""
        if parked.state is RedirectState.DONE:
            return
        if self.parked.get(parked.key) is parked:
            # Should not happen (the thread waits for a claim or an expiry), but
            # never leave a key that would hand out a closed iterator.
            del self.parked[parked.key]
        if parked.timer is not None and parked.timer.active():
            parked.timer.cancel()
        parked.timer = None
        parked.state = RedirectState.DONE
        parked._set_outcome("abandoned")
        self.active.discard(parked)
        assert parked.outcome is not None
        if parked.claimed_at is not None:
            _log.info(
                "[{request_id}] redirected body {outcome}: {bytes}B in {duration:.3f}s",
                request_id=parked.request_id,
                outcome=parked.outcome,
                bytes=parked.bytes_sent,
                duration=self.reactor.seconds() - parked.claimed_at,
            )
        parked.done.callback(parked.outcome)
        if not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- the consumer's fetch ---------------------------------------------------

    def claim(self, key: str, request: Request) -> ParkedResponse | None:
        parked = self.parked.pop(key, None)
        if parked is None:
            self.emit("redirect_refused")
            return None
        if parked.timer is not None and parked.timer.active():
            parked.timer.cancel()
        parked.timer = None
        parked.state = RedirectState.STREAMING
        parked.claimed_at = self.reactor.seconds()
        parked.request = request
        code, _, phrase = parked.status.partition(" ")
        request.setResponseCode(int(code), phrase.encode("latin-1") or None)
        for name, value in parked.headers:
            raw = name.encode("latin-1")
            if is_hop_by_hop(raw) or raw.lower() in (b"server", b"date"):
                continue
            request.responseHeaders.addRawHeader(raw, value.encode("latin-1"))
        if not request.responseHeaders.hasHeader(b"x-request-id"):
            request.setHeader(b"x-request-id", parked.request_id.encode("ascii", "replace"))
        # One response per connection: a key is single use, keep-alive buys nothing.
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
        parked.flow = Flow()
        request.registerProducer(parked.flow, True)
        request.notifyFinish().addErrback(parked._consumer_gone)
        self.emit("redirect_claimed", request_id=parked.request_id)
        _log.info(
            "[{request_id}] redirect fetched by {peer} after {wait:.3f}s",
            request_id=parked.request_id,
            peer=_peer(request),
            wait=parked.claimed_at - parked.parked_at,
        )
        parked._deliver("claimed")
        return parked

    # -- stopping -----------------------------------------------------------------

    def stop_parking(self) -> None:
        self.accepting = False

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is parked or streaming."""
        if not self.active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def abort_all(self) -> None:
        """The drain gave up: close parked responses now and cut running streams."""
        for parked in list(self.parked.values()):
            self._expire(parked, "cancelled")
        for parked in list(self.active):
            if parked.state is RedirectState.STREAMING:
                parked._fail()
                if parked.flow is not None:
                    parked.flow.stopProducing()

    def close_connections(self) -> None:
        self.site.close_connections()

    # -- inspection -----------------------------------------------------------------

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        now = self.reactor.seconds()
        parked = [
            {"request_id": p.request_id, "expires_in": round(max(0.0, p.expires_at - now), 3), "age": round(now - p.parked_at, 3)}
            for p in sorted(self.parked.values(), key=lambda p: p.parked_at)
        ]
        streaming = [
            {
                "request_id": p.request_id,
                "bytes_sent": p.bytes_sent,
                "age": round(now - (p.claimed_at or now), 3),
            }
            for p in sorted(self.active, key=lambda p: p.parked_at)
            if p.state is RedirectState.STREAMING
        ]
        return {"parked": parked, "streaming": streaming}

    def phase_of(self, request_id: str) -> str | None:
        for parked in self.active:
            if parked.request_id == request_id:
                return "redirect " + parked.state.value
        return None


class Parking:
    """
    One job's side of ``--redirect-response``, used by
    :func:`pothead.worker.wsgi.job_app` in the job's WSGI thread.

    It holds back the app's ``start_response`` until the response is about to
    start (the first non-empty chunk, or the end of an empty body); then
    :meth:`offer` either parks a ``200`` (and streams it once fetched) or lets
    the response go through the hub unchanged.  An app that uses the
    ``write()`` callable is never redirected.
    """

    def __init__(self, store: Redirects, hub_request: JobRequest, request_id: str) -> None:
        self._store = store
        self._hub_request = hub_request
        self._request_id = request_id
        self.decided = False
        self.parked: ParkedResponse | None = None
        self._captured: tuple[str, list[tuple[str, str]]] | None = None
        self._start_response: Callable[..., Any] | None = None
        self._write: Callable[[bytes], Any] | None = None

    def wrap(self, start_response: Callable[..., Any]) -> Callable[..., Any]:
        def parking_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if self.parked is not None:
                if exc_info is not None:
                    raise exc_info[1].with_traceback(exc_info[2])
                raise RuntimeError("start_response called again after the response started")
            if self.decided or exc_info is not None:
                # An error page replaces what was captured; it is never parked.
                self.decided = True
                self._captured = None
                self._write = start_response(status, headers, exc_info)
                return self._write
            self._captured = (status, list(headers))
            return self._write_through

        self._start_response = start_response
        return parking_start_response

    def _pass_through(self) -> None:
        self.decided = True
        if self._captured is not None and self._start_response is not None:
            status, headers = self._captured
            self._captured = None
            self._write = self._start_response(status, headers)

    def _write_through(self, data: bytes) -> Any:
        if not self.decided:
            self._pass_through()
        assert self._write is not None
        return self._write(data)

    def offer(self, first: bytes | None, rest: Iterator[bytes]) -> bool:
        """
        The response is about to start.  Park it (True: the body was streamed to
        the consumer, or the key expired, by the time this returns) or let it
        go through the hub (False: the caller goes on as usual).
        """
        if self.decided:
            return False
        captured = self._captured
        if captured is None or not captured[0].startswith("200") or not self._store.accepting:
            self._pass_through()
            return False
        status, headers = captured
        parked = blockingCallFromThread(
            self._store.reactor, self._store.park, self._hub_request, status, headers, self._request_id
        )
        if parked is None:
            self._pass_through()
            return False
        self.decided = True
        self._captured = None
        self.parked = parked
        parked.run(first, rest)
        return True

    def release(self) -> None:
        """After the app's iterator was closed: the job may end (WSGI thread)."""
        if self.parked is not None:
            self._store.reactor.callFromThread(self._store.released, self.parked)


class RedirectResource(Resource):
    """``GET /<key>`` (any prefix before the last ``/``): the parked body, once."""

    isLeaf = True

    def __init__(self, store: Redirects) -> None:
        super().__init__()
        self._store = store

    def render_GET(self, request: Request) -> Any:
        key = request.path.rsplit(b"/", 1)[-1].decode("ascii", "replace")
        if self._store.claim(key, request) is None:
            request.setResponseCode(http.GONE)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", str(len(GONE_BODY)).encode())
            return GONE_BODY
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        # twisted.web would turn HEAD into GET, which would use up the key.
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"allow", b"GET")
        return b""


class ClosingChannel(http.HTTPChannel):
    """An HTTPChannel its :class:`ClosingSite` can find and close when the service stops."""

    site: ClosingSite

    def __init__(self) -> None:
        super().__init__()
        self._close_waiters: list[Deferred[None]] = []

    def when_closed(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channels.discard(self)
        super().connectionLost(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class ClosingSite(Site):
    """A Site for the operator and redirect listeners: no access log, closes its connections on stop."""

    protocol = ClosingChannel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Resource, timeout: float | None = 30.0) -> None:
        super().__init__(resource, timeout=timeout)
        self.channels: set[ClosingChannel] = set()

    def log(self, request: Any) -> None:
        pass

    def close_connections(self) -> None:
        for channel in list(self.channels):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()


class RedirectSite(ClosingSite):
    pass


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host is not None else str(address)
