"""
Consumer requests on their way through the queue to a worker and back.

A consumer request becomes a :class:`ProxyJob`, an explicit state machine::

    QUEUED ──paired──▶ DISPATCHED ──response head──▶ STREAMING ──▶ DONE
      │  ▲                 │                            │
      │  └── requeue ◀─────┤ (not delivered / draining  │
      │     (queue head)   │  worker's 503 + requeue)   │
      └────────────────────┴──────── errors ────────────┴──▶ FAILED

The request was read and its body spooled by :mod:`pothead.hub.front`
before the job exists (memory up to 100 kB, a temporary file beyond), so a
slow uploader never holds a worker.
"""

from __future__ import annotations

import enum
from typing import IO, Any

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from ..headers import asks_requeue, choose_request_id, end_to_end, forwarded_request_headers, origin_form
from ._http11 import NotDelivered, WorkerFailed, WorkerResponse
from .dispatch import Hub
from .front import ConsumerRequest
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
        raw = request.header(b"x-request-id")
        self.request_id = choose_request_id([(b"x-request-id", raw)] if raw is not None else [])
        # Built when first dispatched: a queued job holds no copy of its headers.
        self._forward_headers: list[tuple[bytes, bytes]] | None = None
        self.has_body = request.content is not None
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
            self._forward_headers = forwarded_request_headers(
                request.headers,
                client_address=request.client_host(),
                scheme="https" if request.is_secure() else "http",
                host=request.header(b"host"),
                request_id=self.request_id,
                trust_forwarded=self.hub.config.trust_forwarded,
            )
        return self._forward_headers

    # -- lifecycle ----------------------------------------------------------

    def reject(self, code: int, message: str, *, reason: str) -> None:
        """Answer the consumer at once without queueing (a malformed request)."""
        self.hub.job_started(self)
        self.request.set_response_header(b"X-Request-Id", self.request_id.encode("ascii"))
        self._fail(code, message, reason=reason)

    def start(self) -> None:
        self.hub.job_started(self)
        self.request.set_response_header(b"X-Request-Id", self.request_id.encode("ascii"))
        self.request.on_lost = self._consumer_lost
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
            assert content is not None
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
        request.set_response_code(response.code, response.phrase)
        # The worker's headers, its X-Request-Id in place of ours if it sent one.
        headers = end_to_end(response.headers)
        if any(name.lower() == b"x-request-id" for name, _ in headers):
            request.remove_response_header(b"x-request-id")
        request.response_headers.extend(headers)
        if response.length is not None:
            request.set_response_header(b"Content-Length", b"%d" % response.length)
        response.deliver(self)

    # -- BodySink: the worker's response body -------------------------------

    def body_started(self, producer: IPushProducer) -> None:
        if self.consumer_gone:
            return
        stall = self.hub.config.worker_stall_timeout
        if stall is not None:
            producer = _StallWatch(producer, self.hub, stall, self._worker_stalled)
        self._producer = producer
        self.request.register_producer(producer)

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
        self.request.abort()
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
            self.request.abort()
            self._ended("drain_timeout")
        if connection is not None:
            connection.abort()

    def _unregister(self) -> None:
        if self._producer is not None:
            if isinstance(self._producer, _StallWatch):
                self._producer.cancel()
            self._producer = None
            self.request.unregister_producer()

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
        if not self.consumer_gone and not request.started_writing:
            request.set_response_code(code)
            request.set_response_header(b"Content-Type", b"text/plain; charset=utf-8")
            if retry_after:
                request.set_response_header(b"Retry-After", str(self.hub.config.retry_after).encode("ascii"))
            if close:
                request.close_after()
            body = f"{code} {RESPONSES.get(code, b'').decode()}: {message} (request id {self.request_id})\n".encode()
            request.set_response_header(b"Content-Length", b"%d" % len(body))
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


def handle_request(request: ConsumerRequest) -> None:
    """A complete consumer request: into the queue, or refused at once."""
    hub = request.channel.site.hub
    problem = normalize_target(request)
    job = ProxyJob(hub, request)
    if problem is not None:
        job.reject(400, problem, reason="bad_request")
    else:
        job.start()


def normalize_target(request: ConsumerRequest) -> str | None:
    """
    Make the request fit for the worker hop (RFC 9112 3.2): exactly one Host,
    origin-form target.  Returns a 400 message, or None when all is well.
    """
    authority, target = origin_form(request.uri)
    hosts = request.header_count(b"host")
    if authority is not None:
        # 3.2.3: the authority of an absolute-form target replaces Host.
        request.uri = target
        request.set_request_header(b"host", authority)
    elif hosts > 1:
        return "more than one Host header"
    elif not hosts:
        if request.clientproto != b"HTTP/1.0":
            return "a Host header is required"
        # HTTP/1.0 without Host (health checkers): name the hub's own address.
        here = request.local_address()
        host = getattr(here, "host", "localhost")
        port = getattr(here, "port", None)
        request.set_request_header(
            b"host", (f"{host}:{port}" if port is not None else str(host)).encode("ascii", "replace")
        )
    return None
