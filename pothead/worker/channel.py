"""
The reverse server channel: a twisted.web HTTP *server* speaking over a
connection the worker opened to a hub.

:class:`ReverseChannel` is an ``HTTPChannel`` that reports to its
:class:`~pothead.worker.slots.Link` (connected, lost) and can be *retired*:
an idle connection is never just dropped, because the hub may already have
written a request onto it.  Instead the worker sends an unsolicited
``503`` + ``Pothead-Requeue: 1`` and closes; the hub reads that either as
"this idle connection is going away" or, if its request crossed on the wire,
as the answer to that request, and requeues the job at the head of its queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ..headers import REQUEST_ID, choose_request_id
from .wsgi import Flow, JobResponse, job_app

if TYPE_CHECKING:
    from .redirect import ParkedResponse
    from .slots import Link, WorkerRuntime

#: Written on an idle connection that the worker closes (drain, or a slot
#: that took a job from another hub).
RETIRE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Pothead-Requeue: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

#: The hub marks requests with this header when it will reuse the connection
#: after a response that says ``Connection: keep-alive``.  Hubs that run one
#: job per connection (the reference hub) do not send it, so our worker
#: closes after the job instead of waiting forever on a connection that hub
#: will never use again.
REUSE = b"pothead-reuse"


class JobRequest(Request):
    """One job: a request from the hub, answered by the WSGI app."""

    channel: ReverseChannel
    #: The WSGI app reads wsgi.input itself: never let twisted.web parse a
    #: form body into request.args (a multipart upload would sit in memory).
    _parsePOSTFormSubmission = False
    _flow: Flow | None = None
    _link: Link | None = None
    #: True once the request reached process() (its body is complete).
    processing = False
    request_id = "-"

    def process(self) -> None:
        self.processing = True
        # Keep the link: twisted.web drops request.channel before notifyFinish fires.
        link = self._link = self.channel.link
        self.request_id = choose_request_id(
            [(n, v) for n, vs in self.requestHeaders.getAllRawHeaders() for v in vs if n.lower() == REQUEST_ID]
        )
        if link is None or not link.job_arrived(self):
            self._requeue()
            return
        reusable = self.requestHeaders.getRawHeaders(REUSE, [b""])[0].strip() == b"1"
        self.requestHeaders.removeHeader(REUSE)  # the hub's word to us, not the app's business
        if reusable and link.keep_alive_after_job():
            self.setHeader(b"connection", b"keep-alive")
            self._kept = True
        else:
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
        self.notifyFinish().addBoth(self._job_over)
        super().process()

    def _requeue(self) -> None:
        # This worker is not taking jobs on this connection any more.
        self.setResponseCode(503)
        self.setHeader(b"pothead-requeue", b"1")
        self.setHeader(b"connection", b"close")
        self.setHeader(b"content-length", b"0")
        self.channel.persistent = False
        self.write(b"")
        self.finish()

    _kept = False
    #: Set when the response was parked for --redirect-response (the hub got a 303).
    redirected: ParkedResponse | None = None

    def send_redirect(self, parked: ParkedResponse, location: bytes) -> None:
        """
        Answer the hub ``303 See Other`` for a parked response, and close this
        connection after it: the slot stays busy until the parked body is done,
        so the connection must not go back to the hub as ready.
        """
        self.redirected = parked
        self.setResponseCode(http.SEE_OTHER)
        self.setHeader(b"location", location)
        self.setHeader(b"content-length", b"0")
        self.setHeader(b"cache-control", b"no-store")
        self.setHeader(b"connection", b"close")
        self._kept = False
        if self.channel is not None:
            self.channel.persistent = False
        self.finish()

    #: True while the app's call runs in a WSGI thread.  The job (and its
    #: slot, thread and gate grant) is over only once the response is over
    #: AND the app has returned: a consumer that leaves does not free a CPU
    #: that the app is still using.
    _app_running = False
    _over: object = None
    _over_seen = False

    def app_started(self) -> None:
        self._app_running = True

    def app_returned(self) -> None:
        """Called in the reactor thread when the app's call has returned."""
        self._app_running = False
        if self._over_seen:
            self._report_over(self._over)

    def _job_over(self, result: object) -> None:
        self._over, self._over_seen = result, True
        if not self._app_running:
            self._report_over(result)

    def _fully_sent(self) -> bool:
        # With Connection: close the hub may close as soon as it has the whole
        # body, before our finish() ran: then the response was complete anyway.
        declared = self.responseHeaders.getRawHeaders(b"content-length")
        if not declared or not self.startedWriting:
            return False
        try:
            return self.sentLength >= int(declared[0])
        except ValueError:
            return False

    def _report_over(self, result: object) -> None:
        if getattr(self, "_reported", False):
            return
        self._reported = True
        completed = not isinstance(result, Failure) or self._fully_sent()
        link = self._link
        if self._kept and completed and link is not None and link.channel is not None:
            link.channel.expect_reuse()
        if link is None:
            return
        redirected = self.redirected
        if redirected is not None and completed:
            # The hub has its 303; the job goes on until the parked body has
            # been sent, abandoned or expired (the WSGI thread let go of it).
            def over(outcome: str) -> None:
                link.job_over(self, completed=outcome in ("sent", "expired"))

            redirected.done.addCallback(over)
            return
        link.job_over(self, completed=completed)

    def start_flow(self) -> Flow:
        self._flow = Flow()
        self.registerProducer(self._flow, True)
        return self._flow

    def finish(self) -> None:
        if self._flow is not None:
            self._flow = None
            self.unregisterProducer()
        super().finish()


class JobResource(Resource):
    """Renders every request with the worker's WSGI app on its thread pool."""

    isLeaf = True

    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__()
        self._runtime = runtime

    def render(self, request: JobRequest) -> Any:  # type: ignore[override]
        runtime = self._runtime
        flow = request.start_flow()
        link = request.channel.link
        prepare = link.slot.prepare_environ if link is not None else None
        parking = None
        if runtime.redirects is not None and request.method != b"HEAD":
            # (A HEAD response has no body to fetch; it goes through the hub.)
            from .redirect import Parking

            parking = Parking(runtime.redirects, request, request.request_id)
        app = job_app(runtime.app, request.request_id, flow, prepare, parking)
        request.app_started()
        JobResponse(runtime.reactor, runtime.threadpool, app, request, flow, request.app_returned).start()
        return NOT_DONE_YET


@implementer(IHandshakeListener)
class ReverseChannel(http.HTTPChannel):
    """HTTPChannel over an outgoing connection, tied to one Link."""

    #: True once a TLS handshake with the hub succeeded (TLS connections only).
    tls_verified = False

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the hub's certificate was accepted."""
        self.tls_verified = True
        if self.link is not None:
            self.link.tls_verified()

    link: Link | None = None
    _log = Logger()
    #: Seconds a kept-alive connection may wait for the hub's *first* reuse of
    #: it.  Through the original hub, which forwards every consumer header, a
    #: consumer could send Pothead-Reuse: 1; that hub never reuses a
    #: connection, so without this bound the slot would wait forever.  A
    #: connection the hub has reused once has no limit.
    UNPROVEN_REUSE_IDLE = 2.0
    _reuse_timer: IDelayedCall | None = None
    _reuse_proven = False

    def expect_reuse(self) -> None:
        if self._reuse_proven or self._reuse_timer is not None or self.transport is None:
            return
        if self.transport.disconnecting:
            return
        from twisted.internet import reactor

        self._reuse_timer = reactor.callLater(self.UNPROVEN_REUSE_IDLE, self._reuse_not_seen)

    def _reuse_not_seen(self) -> None:
        self._reuse_timer = None
        self.retire()

    def _cancel_reuse_timer(self) -> None:
        if self._reuse_timer is not None:
            if self._reuse_timer.active():
                self._reuse_timer.cancel()
            self._reuse_timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._reuse_timer is not None:
            self._cancel_reuse_timer()
            self._reuse_proven = True
        super().dataReceived(data)

    def connectionMade(self) -> None:
        super().connectionMade()
        if ITCPTransport.providedBy(self.transport):
            # Finds a hub that vanished without a FIN; an idle worker
            # connection has no timeout of its own.
            self.transport.setTcpKeepAlive(True)
            # Requests and responses are single writes: never wait for an ACK.
            self.transport.setTcpNoDelay(True)
        if self.link is not None:
            self.link.connected(self)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_reuse_timer()
        super().connectionLost(reason)
        if self.link is not None:
            self.link.lost(self, reason)

    @property
    def idle(self) -> bool:
        return not self.requests

    def retire(self) -> None:
        """Close without losing a request that may be on its way (see module doc)."""
        if self.transport.disconnecting:
            return  # already closing after a Connection: close response
        if any(getattr(r, "processing", False) for r in self.requests):
            return  # a job runs here: the link no longer keeps the connection after it
        # Idle, or a request still arriving (its body may never come: the
        # original hub forwards Content-Length without the body).  Either way
        # the app has not seen it: answer "requeue" and close.
        self._cancel_reuse_timer()
        self.transport.write(RETIRE)
        self.persistent = False
        self.loseConnection()


class ReverseSite(Site):
    """The worker's Site: no idle timeout (idle is the normal state here)."""

    protocol = ReverseChannel
    requestFactory = JobRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(JobResource(runtime), timeout=None)
        # Requests copy this from the Site: the app reads wsgi.input itself.
        self._parsePOSTFormSubmission = False

    def log(self, request: Request) -> None:
        # The runtime writes one structured line per job instead.
        pass
