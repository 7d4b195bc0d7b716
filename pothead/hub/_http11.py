"""
The one place that touches ``twisted.web._newclient`` (private API).

:class:`ReverseHTTPClient` drives an HTTP/1.1 *client* over a connection the
hub accepted from a worker, and translates ``_newclient``'s exceptions into
the two outcomes the hub cares about:

* :class:`NotDelivered` -- the request cannot have reached the application
  (the connection was dead or died before the request was fully written), so
  the job may be put back at the head of the queue;
* :class:`WorkerFailed` -- the request was written and the worker failed
  afterwards (died, or sent malformed HTTP): the consumer gets a 502.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    PotentialDataLoss,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from ..headers import connection_tokens


class NotDelivered(Exception):
    """The request never fully reached the worker: safe to requeue."""


class WorkerFailed(Exception):
    """The request reached the worker but no usable response came back."""


class BodySink(TypingProtocol):
    """Receives a response body; see :meth:`WorkerResponse.deliver`."""

    def body_started(self, producer: IPushProducer) -> None: ...
    def body_data(self, data: bytes) -> None: ...
    def body_done(self) -> None: ...
    def body_failed(self, reason: Failure) -> None: ...


class _BodyProtocol(Protocol):
    def __init__(self, sink: BodySink) -> None:
        self._sink = sink

    def connectionMade(self) -> None:
        # The transport is a proxy for the worker connection's push producer:
        # pausing it stops reading from the worker socket (backpressure).
        self._sink.body_started(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self._sink.body_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        # PotentialDataLoss ends a close-delimited body (no Content-Length, not
        # chunked): that close *is* the end of the message.
        if reason.check(ResponseDone, PotentialDataLoss):
            self._sink.body_done()
        else:
            self._sink.body_failed(reason)


class WorkerResponse:
    """Status line and end-to-end headers of a worker's response."""

    def __init__(self, response: IResponse, connection_headers: Headers) -> None:
        self._response = response
        self.code: int = response.code
        self.phrase: bytes = response.phrase
        # _newclient files Connection under the connection headers; the
        # headers it names are hop-by-hop too (RFC 9110 7.6.1).
        named = connection_tokens((b"connection", v) for v in connection_headers.getRawHeaders(b"connection", []))
        self.headers: list[tuple[bytes, bytes]] = [
            (name, value)
            for name, values in response.headers.getAllRawHeaders()
            for value in values
            if name.lower() not in named
        ]
        # The declared Content-Length, passed on to the consumer (for HEAD it
        # describes the resource, not this empty body).  With Transfer-Encoding
        # the body is decoded and re-framed, so any Content-Length is ignored.
        self.length: int | None = None
        declared = connection_headers.getRawHeaders(b"content-length")
        if declared and not connection_headers.hasHeader(b"transfer-encoding"):
            try:
                self.length = int(declared[0])
            except ValueError:
                self.length = None

    def deliver(self, sink: BodySink) -> None:
        """Stream the body to ``sink`` (call exactly once)."""
        self._response.deliverBody(_BodyProtocol(sink))


class _Protocol(HTTP11ClientProtocol):
    """
    Keeps the bytes that arrived after a complete response.  _newclient drops
    them (it does not pipeline); for us they matter: a worker that stops
    right after a job sends its retire notice (503 + Pothead-Requeue) hard
    on the heels of the response, often in the same read.
    """

    leftover = b""

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        self.leftover = rest
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING


class ReverseHTTPClient:
    """
    An HTTP/1.1 client on one worker connection.

    ``attach`` it to the transport once the connection may carry requests
    (after any handshake); feed it ``dataReceived``/``connectionLost``.
    :attr:`reusable` is true once the last response completed and the worker
    said ``Connection: keep-alive`` explicitly; without that the connection is
    closed after the response, which avoids dispatching onto a connection the
    worker is about to close (the reference worker closes after each job).
    """

    #: Largest response head (status line and headers) a worker may send;
    #: _newclient limits each line but not their number.
    MAX_RESPONSE_HEAD = 65536

    def __init__(self) -> None:
        self._head_pending = False
        self._head_bytes = 0
        self._protocol = _Protocol(quiescentCallback=self._quiescent)
        self._connection_headers: Headers | None = None
        self.reusable = False
        self.attached = False

    def attach(self, transport: ITransport) -> None:
        self.attached = True
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._protocol.dataReceived(data)
        if self._head_pending:
            self._head_bytes += len(data)
            if self._head_bytes > self.MAX_RESPONSE_HEAD:
                # The request fails with ResponseFailed -> WorkerFailed (502).
                self._head_pending = False
                self._protocol.abort()

    def connectionLost(self, reason: Failure) -> None:
        self._protocol.connectionLost(reason)

    def abort(self) -> None:
        self._protocol.abort()

    def _quiescent(self, protocol: HTTP11ClientProtocol) -> None:
        tokens: set[bytes] = set()
        for value in (self._connection_headers or Headers()).getRawHeaders(b"connection", []):
            tokens.update(t.strip().lower() for t in value.split(b","))
        leftover, self._protocol.leftover = self._protocol.leftover, b""
        if b"keep-alive" in tokens and not leftover:
            self.reusable = True
        else:
            # Not offered for reuse, or the worker already said more (its
            # retire notice): this connection is finished.
            protocol.transport.loseConnection()

    def send(
        self,
        method: bytes,
        uri: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
    ) -> Deferred[WorkerResponse]:
        """Write one request; fires with the response head, or fails with
        :class:`NotDelivered` / :class:`WorkerFailed`."""
        self.reusable = False
        self._head_pending = True
        self._head_bytes = 0
        raw = Headers()
        for name, value in headers:
            raw.addRawHeader(name, value)
        try:
            sent = self._protocol.request(Request(method, uri, raw, body, persistent=True))
        except Exception as e:  # an invalid method/URI refused by _newclient
            sent = Deferred()
            sent.errback(WorkerFailed(f"request could not be written: {e}"))
            return sent
        parser = getattr(self._protocol, "_parser", None)
        connection_headers: Headers = parser.connHeaders if parser is not None else Headers()
        self._connection_headers = connection_headers

        def translate(failure: Failure) -> Failure:
            if failure.check(RequestNotSent, RequestTransmissionFailed):
                return Failure(NotDelivered(_describe(failure)))
            if failure.check(ResponseNeverReceived) and _reset_unread(failure):
                return Failure(NotDelivered(f"worker reset the connection without reading the request ({_describe(failure)})"))
            if failure.check(ResponseFailed):
                return Failure(WorkerFailed(_describe(failure)))
            return failure

        def head_over(result: object) -> object:
            self._head_pending = False
            return result

        sent.addBoth(head_over)
        sent.addErrback(translate)
        return sent.addCallback(WorkerResponse, connection_headers)


def _reset_unread(failure: Failure) -> bool:
    """
    True when the worker's side *reset* the connection before any byte of a
    response.  A process that dies (SIGKILL, crash) with unread bytes in its
    socket makes its kernel send RST instead of FIN; our worker reads the
    whole request before the app starts, so a reset with no response means
    the job never ran: it is requeued, not answered 502.  A clean close (FIN)
    after the request was written stays a 502 -- the worker may have read it.
    """
    reasons = getattr(failure.value, "reasons", None) or []
    return bool(reasons) and all(r.check(ConnectionLost) and not r.check(ConnectionDone) for r in reasons)


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() or r.type.__name__ for r in reasons)
    return failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]
