"""
The consumer port: twisted.web in front of the queue.

A consumer request becomes a :class:`ProxyJob`, an explicit state machine::

    QUEUED ──paired──▶ DISPATCHED ──response head──▶ STREAMING ──▶ DONE
      │  ▲                 │                            │
      │  └── requeue ◀─────┤ (not delivered / draining  │
      │     (queue head)   │  worker's 503 + requeue)   │
      └────────────────────┴──────── errors ────────────┴──▶ FAILED

The body was spooled by twisted.web before the job exists (memory up to
100 kB, a temporary file beyond), so a slow uploader never holds a worker.
"""

from __future__ import annotations

import enum
import re
from typing import IO, Any

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ..headers import asks_requeue, choose_request_id, end_to_end, forwarded_request_headers, origin_form
from ._http11 import NotDelivered, WorkerFailed, WorkerResponse
from .dispatch import Hub
from .queue import QueueFull
from .workers import WorkerConnection

CHUNK = 65536


@implementer(IBodyProducer)
class SpooledBody:
    """
    Streams a spooled request body to a worker, from the start of the file.

    Unlike ``FileBodyProducer`` it never closes the file, so a requeued job
    can send the same body again on another connection.
    """

    def __init__(self, body: IO[bytes], length: int) -> None:
        self._body = body
        self.length = length
        self._task: task.CooperativeTask | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._body.seek(0)
        self._task = task.cooperate(self._chunks(consumer))
        done: Deferred[None] = Deferred()

        def finished(_: object) -> None:
            done.callback(None)

        def stopped(reason: Failure) -> Failure | None:
            # IBodyProducer: the Deferred must not fire after stopProducing.
            if reason.check(task.TaskStopped):
                return None
            done.errback(reason)
            return None

        self._task.whenDone().addCallbacks(finished, stopped)
        return done

    def _chunks(self, consumer: IConsumer) -> Any:
        while True:
            data = self._body.read(CHUNK)
            if not data:
                return
            consumer.write(data)
            yield None

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except (task.TaskDone, task.TaskFailed, task.TaskStopped):
                pass


class JobState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"


class ProxyJob:
    """One consumer request on its way through the queue to a worker and back."""

    _log = Logger()

    __slots__ = (
        "hub",
        "request",
        "request_id",
        "_forward_headers",
        "has_body",
        "state",
        "arrived",
        "deadline",
        "dispatched_at",
        "worker",
        "connection",
        "requeues",
        "bytes_sent",
        "consumer_gone",
        "_waiting",
        "_producer",
        "status",
        "__weakref__",
    )

    def __init__(self, hub: Hub, request: ConsumerRequest) -> None:
        self.hub = hub
        self.request = request
        headers = request.requestHeaders
        raw = headers.getRawHeaders(b"x-request-id")
        self.request_id = choose_request_id([(b"x-request-id", raw[0])] if raw else [])
        # Built when first dispatched: a queued job holds no copy of its headers.
        self._forward_headers: list[tuple[bytes, bytes]] | None = None
        self.has_body = headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
        self.state = JobState.QUEUED
        self.arrived = hub.clock.seconds()
        self.deadline = None if hub.config.queue_timeout is None else self.arrived + hub.config.queue_timeout
        self.dispatched_at: float | None = None
        self.worker: str | None = None
        self.connection: WorkerConnection | None = None
        self.requeues = 0
        self.bytes_sent = 0
        self.consumer_gone = False
        self._waiting: Deferred[WorkerConnection] | None = None
        self._producer: IPushProducer | None = None
        self.status: int | None = None

    @property
    def forward_headers(self) -> list[tuple[bytes, bytes]]:
        """The request headers as the worker gets them (see :func:`forwarded_request_headers`)."""
        if self._forward_headers is None:
            request = self.request
            raw = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
            client = request.getClientAddress()
            self._forward_headers = forwarded_request_headers(
                raw,
                client_address=getattr(client, "host", None),
                scheme="https" if request.isSecure() else "http",
                host=request.getHeader(b"host"),
                request_id=self.request_id,
                trust_forwarded=self.hub.config.trust_forwarded,
            )
        return self._forward_headers

    # -- lifecycle ----------------------------------------------------------

    def reject(self, code: int, message: str, *, reason: str) -> None:
        """Answer the consumer at once without queueing (a malformed request)."""
        self.hub.job_started(self)
        self.request.setHeader(b"x-request-id", self.request_id.encode("ascii"))
        self._fail(code, message, reason=reason)

    def start(self) -> None:
        self.hub.job_started(self)
        self.request.setHeader(b"x-request-id", self.request_id.encode("ascii"))
        self.request.notifyFinish().addErrback(self._consumer_lost)
        if self.hub.draining:
            self._fail(503, "the hub is shutting down; retry shortly", reason="draining", retry_after=True, close=True)
            return
        self._enqueue(front=False)

    def _enqueue(self, *, front: bool) -> None:
        self.state = JobState.QUEUED
        try:
            waiting = self.hub.queue.get_connection(front=front, since=self.arrived)
        except QueueFull:
            self._fail(503, "the queue is full; retry later", reason="queue_full", retry_after=True)
            return
        if self.deadline is not None and not waiting.called:
            remaining = max(0.0, self.deadline - self.hub.clock.seconds())
            waiting.addTimeout(remaining, self.hub.clock)
        self._waiting = waiting
        waiting.addCallbacks(self._dispatch, self._not_paired)

    def _not_paired(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(TimeoutError):
            self._fail(503, "no worker became free in time; retry later", reason="queue_timeout", retry_after=True)
        elif failure.check(CancelledError):
            if not self.consumer_gone:  # cancelled by the drain giving up
                self._fail(503, "the hub is shutting down; retry shortly", reason="draining", retry_after=True)
        else:
            self._log.failure("[{request_id}] unexpected queue error", failure, request_id=self.request_id)
            self._fail(500, "internal error in the hub", reason="internal")

    def _dispatch(self, connection: WorkerConnection) -> None:
        self._waiting = None
        if self.consumer_gone:
            # Cancellation normally withdraws the job first; be safe anyway
            # and hand the still-idle connection back.
            self.hub.queue.connection_ready(connection)
            return
        self.state = JobState.DISPATCHED
        self.connection = connection
        self.worker = connection.peer
        if self.dispatched_at is None:
            self.dispatched_at = self.hub.clock.seconds()
        body = None
        if self.has_body:
            content = self.request.content
            content.seek(0, 2)
            body = SpooledBody(content, content.tell())
        sent = connection.dispatch(self.request.method, self.request.uri, self.forward_headers, body)
        sent.addCallbacks(self._got_response, self._not_answered)

    def _not_answered(self, failure: Failure) -> None:
        if self.consumer_gone or self.state is not JobState.DISPATCHED:
            return
        # Drop the failed connection first: a requeue may pair the job with a
        # new connection at once, and that one must not be touched.
        failed, self.connection = self.connection, None
        if failed is not None:
            failed.abort()
        if failure.check(NotDelivered):
            self._requeue(f"request not delivered to {self.worker} ({failure.getErrorMessage()})", "not_delivered")
        elif failure.check(WorkerFailed):
            self._fail(
                502,
                "the worker failed before answering",
                reason="bad_gateway",
                detail=failure.getErrorMessage(),
            )
        else:
            self._log.failure("[{request_id}] unexpected dispatch error", failure, request_id=self.request_id)
            self._fail(502, "the worker failed before answering", reason="bad_gateway")

    def _requeue(self, why: str, reason: str) -> None:
        self.requeues += 1
        self.hub.emit("requeue", reason=reason)
        self._log.info("[{request_id}] requeued at the head of the queue: {why}", request_id=self.request_id, why=why)
        self.connection = None
        self.worker = None
        self.state = JobState.QUEUED
        # Not at once: events already read in this reactor turn (another
        # connection of the same dead worker closing) must land first, or the
        # job could be written onto a connection whose FIN is already here.
        self.hub.clock.callLater(0, self._requeue_now)

    def _requeue_now(self) -> None:
        if self.consumer_gone or self.state is not JobState.QUEUED or self._waiting is not None:
            return
        if self.hub.draining_workers:
            self._fail(503, "the hub is shutting down; retry shortly", reason="draining", retry_after=True)
            return
        self._enqueue(front=True)

    def _got_response(self, response: WorkerResponse) -> None:
        connection = self.connection
        assert connection is not None
        if self.consumer_gone or self.state is not JobState.DISPATCHED:
            connection.abort()
            return
        if asks_requeue(response.code, response.headers):
            response.deliver(_Discard())
            connection.job_finished()
            self._requeue(f"worker {self.worker} is draining or retiring the connection", "worker_draining")
            return
        self.state = JobState.STREAMING
        self.status = response.code
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        headers = request.responseHeaders
        headers.removeHeader(b"server")
        for name, value in end_to_end(response.headers):
            if name.lower() in (b"date", b"server", b"x-request-id") and headers.hasHeader(name):
                headers.removeHeader(name)
            headers.addRawHeader(name, value)
        if not headers.hasHeader(b"x-request-id"):
            headers.setRawHeaders(b"x-request-id", [self.request_id.encode("ascii")])
        if response.length is not None:
            headers.setRawHeaders(b"content-length", [b"%d" % response.length])
        response.deliver(self)

    # -- BodySink: the worker's response body -------------------------------

    def body_started(self, producer: IPushProducer) -> None:
        if self.consumer_gone:
            return
        stall = self.hub.config.worker_stall_timeout
        if stall is not None:
            producer = _StallWatch(producer, self.hub, stall, self._worker_stalled)
        self._producer = producer
        self.request.registerProducer(producer, True)

    def body_data(self, data: bytes) -> None:
        if self.consumer_gone:
            return
        self.bytes_sent += len(data)
        if isinstance(self._producer, _StallWatch):
            self._producer.progress()
        self.request.write(data)

    def _worker_stalled(self) -> None:
        if self.state is not JobState.STREAMING or self.consumer_gone:
            return
        self._log.warn(
            "[{request_id}] worker {worker} sent nothing for {stall:g}s mid-body",
            request_id=self.request_id,
            worker=self.worker,
            stall=self.hub.config.worker_stall_timeout,
        )
        self.body_failed(Failure(TimeoutError("worker stalled mid-body")))

    def body_done(self) -> None:
        if self.consumer_gone or self.state is not JobState.STREAMING:
            return
        self._unregister()
        self.state = JobState.DONE
        # Free the worker connection first: it may take the next job while we
        # finish this response and write its access line.
        if self.connection is not None:
            self.connection.job_finished()
        self.request.finish()
        self._ended("ok")

    def body_failed(self, reason: Failure) -> None:
        if self.consumer_gone or self.state is not JobState.STREAMING:
            return
        self._unregister()
        self.state = JobState.FAILED
        self._log.warn(
            "[{request_id}] worker {worker} failed mid-body after {bytes} bytes ({why}); aborting the consumer connection",
            request_id=self.request_id,
            worker=self.worker,
            bytes=self.bytes_sent,
            why=reason.getErrorMessage(),
        )
        self.request.transport.abortConnection()
        self._ended("truncated")
        if self.connection is not None:
            self.connection.abort()

    def give_up(self) -> None:
        """The hub's drain timed out: end this job now."""
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()  # -> _not_paired -> 503
            return
        connection = self.connection
        if self.state in (JobState.DISPATCHED, JobState.STREAMING):
            # The job may have partly run: cut the consumer off rather than
            # invite a retry with a 503.
            self._unregister()
            self.state = JobState.FAILED
            self.request.transport.abortConnection()
            self._ended("drain_timeout")
        if connection is not None:
            connection.abort()

    def _unregister(self) -> None:
        if self._producer is not None:
            if isinstance(self._producer, _StallWatch):
                self._producer.cancel()
            self._producer = None
            self.request.unregisterProducer()

    # -- endings ------------------------------------------------------------

    def _consumer_lost(self, reason: Failure) -> None:
        if self.state in (JobState.DONE, JobState.FAILED):
            return
        self.consumer_gone = True
        previous = self.state
        self.state = JobState.FAILED
        if isinstance(self._producer, _StallWatch):
            self._producer.cancel()
        self._producer = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
            self._log.info("[{request_id}] consumer left while queued; job withdrawn", request_id=self.request_id)
        elif self.connection is not None:
            self._log.info(
                "[{request_id}] consumer left during the job ({state}); aborting worker connection {worker}",
                request_id=self.request_id,
                state=previous.value,
                worker=self.worker,
            )
            self.connection.abort()
        self._ended("consumer_gone")

    def _fail(
        self,
        code: int,
        message: str,
        *,
        reason: str,
        retry_after: bool = False,
        close: bool = False,
        detail: str | None = None,
    ) -> None:
        self.state = JobState.FAILED
        self.status = code
        request = self.request
        if not self.consumer_gone and not request.startedWriting:
            request.setResponseCode(code)
            request.responseHeaders.removeHeader(b"server")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            if retry_after:
                request.setHeader(b"retry-after", str(self.hub.config.retry_after).encode("ascii"))
            if close:
                # twisted.web decides persistence from the request; say it to the channel too.
                request.setHeader(b"connection", b"close")
                if getattr(request, "channel", None) is not None:
                    request.channel.persistent = False
            body = f"{code} {http.RESPONSES.get(code, b'').decode()}: {message} (request id {self.request_id})\n".encode()
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
        self.hub.emit("rejected", reason=reason)
        if detail:
            self._log.warn("[{request_id}] {code}: {detail}", request_id=self.request_id, code=code, detail=detail)
        self._ended(reason)

    def _ended(self, outcome: str) -> None:
        now = self.hub.clock.seconds()
        queue_wait = (self.dispatched_at or now) - self.arrived
        job_time = now - self.dispatched_at if self.dispatched_at is not None else 0.0
        self.hub.emit(
            "request",
            outcome=outcome,
            status=self.status,
            queue_wait=queue_wait,
            job_time=job_time,
            dispatched=self.dispatched_at is not None,
        )
        method = self.request.method.decode("latin-1")
        path = self.request.uri.decode("latin-1")
        worker = self.worker or "-"
        # The line is formatted here with str.format (C) rather than by the
        # logging system's pure-Python formatter: the access line is the one
        # event every request writes.  The fields stay on the event (JSON).
        self._log.emit(
            LogLevel.info,
            "{log_text}",
            log_text=f"[{self.request_id}] {method} {path} {self.status} {self.bytes_sent}B "
            f"queue={queue_wait:.3f}s job={job_time:.3f}s worker={worker} outcome={outcome}",
            request_id=self.request_id,
            method=method,
            path=path,
            status=self.status,
            bytes=self.bytes_sent,
            queue_wait=queue_wait,
            job_time=job_time,
            worker=worker,
            outcome=outcome,
            access=True,
        )
        self.hub.job_ended(self)


@implementer(IPushProducer)
class _StallWatch:
    """
    The worker connection's push producer, watched for stalls: a response
    body that makes no progress for ``timeout`` seconds *while the consumer
    is ready for more* is a stalled worker.  Paused time (a slow consumer,
    our own backpressure) never counts.  The hub checks every watch from one
    timer (:meth:`Hub.watch_stalls`): no timer per response.
    """

    __slots__ = ("_producer", "_hub", "timeout", "_on_stall", "last", "paused")

    def __init__(self, producer: IPushProducer, hub: Hub, timeout: float, on_stall: Any) -> None:
        self._producer = producer
        self._hub = hub
        self.timeout = timeout
        self._on_stall = on_stall
        self.last = hub.clock.seconds()
        self.paused = False
        hub.watch_stalls(self)

    def stalled(self) -> None:
        """Called by the hub's check: no progress for ``timeout`` seconds."""
        self._on_stall()

    def progress(self) -> None:
        self.last = self._hub.clock.seconds()

    def cancel(self) -> None:
        self._hub.unwatch_stalls(self)

    def pauseProducing(self) -> None:
        self.paused = True
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.last = self._hub.clock.seconds()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self._producer.stopProducing()


class _Discard:
    """A body sink that drops everything (a draining worker's 503 body)."""

    def body_started(self, producer: IPushProducer) -> None:
        pass

    def body_data(self, data: bytes) -> None:
        pass

    def body_done(self) -> None:
        pass

    def body_failed(self, reason: Failure) -> None:
        pass


class ConsumerResource(Resource):
    """Every path: forward through the queue."""

    isLeaf = True

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self._hub = hub

    def render(self, request: ConsumerRequest) -> Any:  # type: ignore[override]
        problem = normalize_target(request)
        job = ProxyJob(self._hub, request)
        if problem is not None:
            job.reject(400, problem, reason="bad_request")
        else:
            job.start()
        return NOT_DONE_YET


def normalize_target(request: Request) -> str | None:
    """
    Make the request fit for the worker hop (RFC 9112 3.2): exactly one Host,
    origin-form target.  Returns a 400 message, or None when all is well.
    """
    authority, target = origin_form(request.uri)
    hosts = request.requestHeaders.getRawHeaders(b"host", [])
    if authority is not None:
        # 3.2.3: the authority of an absolute-form target replaces Host.
        request.uri = target
        request.requestHeaders.setRawHeaders(b"host", [authority])
    elif len(hosts) > 1:
        return "more than one Host header"
    elif not hosts:
        if request.clientproto != b"HTTP/1.0":
            return "a Host header is required"
        # HTTP/1.0 without Host (health checkers): name the hub's own address.
        here = request.getHost()
        host = getattr(here, "host", "localhost")
        port = getattr(here, "port", None)
        request.requestHeaders.setRawHeaders(
            b"host", [(f"{host}:{port}" if port is not None else str(host)).encode("ascii", "replace")]
        )
    return None


class ConsumerRequest(Request):
    """A consumer request whose body is limited to the site's ``max_body``."""

    _rejected = False
    #: The worker's response headers pass unchanged: no twisted.web text/html default.
    defaultContentType = None
    #: Never parse form bodies into request.args: the hub only forwards the
    #: body, and twisted.web would read a multipart upload wholly into memory.
    _parsePOSTFormSubmission = False

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        limit = self.channel.site.max_body
        if self.content.tell() + len(data) > limit:
            self._rejected = True
            self.channel.refuse(413, f"request body larger than {limit} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)


#: RFC 9110 5.6.2 token characters: the only ones allowed in a header name.
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Control characters other than HTAB (RFC 9110 5.5): never valid in a header value.
_CTL = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


class ConsumerChannel(http.HTTPChannel):
    """
    HTTPChannel answering oversized input with 413/414/431 instead of a bare
    400, and stricter than twisted.web where a lenient parse could let a
    request be read differently by a proxy in front (request smuggling):

    * lines must end in CRLF (a bare LF is 400), obs-fold is 400;
    * header names must be tokens, values free of control characters;
    * ``Transfer-Encoding`` must be exactly one ``chunked`` on HTTP/1.1
      (other codings 501, repeats or HTTP/1.0 400); twisted.web already
      refuses Content-Length with Transfer-Encoding, repeated or non-digit
      Content-Length;
    * a chunk larger than ``--max-body`` is 413 as soon as its size line is read;
    * the request head must arrive within ``--header-timeout`` of its first
      byte (408).  An idle connection with no request started is left to
      ``--consumer-timeout``.
    """

    site: ConsumerSite
    _refused = False
    _log = Logger()
    # Split on LF and insist on the CR ourselves: twisted.web waits forever
    # for a CRLF that a bare-LF client never sends.
    delimiter = b"\n"
    _header_timer: Any = None
    _awaiting_head = True
    _transfer_encodings = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.site.channels.discard(self)
        self._cancel_header_timer()
        super().connectionLost(reason)

    # -- header timeout ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if (
            data
            and self._awaiting_head
            and self._header_timer is None
            and not self._handlingRequest
            and not self._refused
            and self.site.header_timeout is not None
        ):
            self._header_timer = self.callLater(self.site.header_timeout, self._header_timeout)
        super().dataReceived(data)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_head and not self._refused:
            self.refuse(408, f"request head not received within {self.site.header_timeout:g}s")

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def requestDone(self, request: Request) -> None:
        self._awaiting_head = True
        self._transfer_encodings = 0
        self._cancel_header_timer()
        super().requestDone(request)

    # -- strict parsing --------------------------------------------------------

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            self.refuse(400, "invalid header name")
            return False
        value = value.strip(b" \t")
        if value != value.translate(None, _CTL):
            self.refuse(400, "control character in a header value")
            return False
        if name.lower() == b"transfer-encoding":
            self._transfer_encodings += 1
            codings = [c.strip().lower() for c in value.split(b",")]
            if any(c != b"chunked" for c in codings):
                self.refuse(501, "only Transfer-Encoding: chunked is supported")
                return False
            if self._transfer_encodings > 1 or len(codings) > 1:
                self.refuse(400, "Transfer-Encoding: chunked given more than once")
                return False
            if getattr(self, "_version", None) != b"HTTP/1.1":
                self.refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
                return False
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        decoder = self._transferDecoder
        if (
            not self._refused
            and isinstance(decoder, http._ChunkedTransferDecoder)
            and decoder.state == "BODY"
            and decoder.length > self.site.max_body
        ):
            self.refuse(413, f"request body larger than {self.site.max_body} bytes")

    def refuse(self, code: int, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        self._cancel_header_timer()
        reason = {
            408: "header_timeout",
            413: "body_too_large",
            414: "uri_too_long",
            431: "headers_too_large",
            501: "not_implemented",
        }.get(code, "bad_request")
        # No job exists yet: the event carries the status for the request count.
        self.site.hub.emit("rejected", reason=reason, status=code, job=False)
        peer = self.transport.getPeer()
        self._log.info(
            "[-] {code} refused before the request was complete: {message} (client {client})",
            code=code,
            message=message,
            client=getattr(peer, "host", "?"),
            status=code,
            access=True,
        )
        body = f"{code} {http.RESPONSES.get(code, b'').decode()}: {message}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, http.RESPONSES.get(code, b"Error"), len(body), body)
        )
        # Ignore whatever else arrives; the connection is closing.
        self.dataReceived = self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.loseConnection()

    _header_lines = 0

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not line.endswith(b"\r"):
            self.refuse(400, "line not ended by CRLF (bare LF)")
            return
        line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            self.refuse(400, "obsolete line folding or leading whitespace")
            return
        if not line:
            self._header_lines = 0
        elif self.requests and line[:1] not in b" \t":
            self._header_lines += 1
            if self._header_lines > self.maxHeaders:
                self.refuse(431, f"more than {self.maxHeaders} request headers")
                return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            if not self.requests:
                self.refuse(414, "request line too long")
            else:
                self.refuse(431, f"request header block larger than {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self.requests:
            self.refuse(414, "request line too long")
        else:
            self.refuse(431, "request header line too long")

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_header_timer()
        limit = self.site.max_body
        if self.length is not None and self.length > limit:
            self.refuse(413, f"request body larger than {limit} bytes")
            return
        super().allHeadersReceived()


class ConsumerSite(Site):
    """The consumer-facing site: one leaf resource, limits from the hub config."""

    protocol = ConsumerChannel
    requestFactory = ConsumerRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, hub: Hub) -> None:
        super().__init__(ConsumerResource(hub), timeout=hub.config.consumer_idle_timeout)
        self.hub = hub
        self.max_body = hub.config.max_body
        # Requests copy this from the Site: never parse form bodies (a
        # multipart upload would be read wholly into memory).
        self._parsePOSTFormSubmission = False
        self.header_timeout = hub.config.header_timeout
        self.max_connections = hub.config.max_connections
        self.connections_refused = 0
        #: Open consumer connections, closed gracefully at the end of a drain.
        self.channels: set[ConsumerChannel] = set()

    def close_connections(self, clock: Any, grace: float) -> Deferred[None]:
        """
        Close every consumer connection after its buffered bytes are sent;
        abort those still open after ``grace`` seconds.  Without this the
        reactor's shutdown would cut off the last responses of a drain.
        """
        done: Deferred[None] = Deferred()
        for channel in list(self.channels):
            channel.loseConnection()

        def check(deadline: float) -> None:
            if not self.channels or clock.seconds() >= deadline:
                for channel in list(self.channels):
                    channel.transport.abortConnection()
                done.callback(None)
            else:
                clock.callLater(0.02, check, deadline)

        check(clock.seconds() + grace)
        return done

    def buildProtocol(self, addr: Any) -> Any:
        if self.max_connections is not None and len(self.channels) >= self.max_connections:
            # Over the cap: a 503 costs one write, then the connection goes.
            self.connections_refused += 1
            self.hub.emit("rejected", reason="too_many_connections", status=503, job=False)
            return _TooManyConnections()
        channel: ConsumerChannel = super().buildProtocol(addr)
        channel.totalHeadersSize = self.hub.config.max_header_bytes
        channel.MAX_LENGTH = self.hub.config.max_header_bytes
        return channel

    def log(self, request: Request) -> None:
        # ProxyJob writes one structured access line per request instead.
        pass


class _TooManyConnections(Protocol):
    """Answers a connection over ``--max-connections`` with a 503 and closes it."""

    BODY = b"503 Service Unavailable: too many connections\n"

    def connectionMade(self) -> None:
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(self.BODY), self.BODY)
        )
        self.transport.loseConnection()
