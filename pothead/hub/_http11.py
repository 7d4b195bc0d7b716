"""
The hub's HTTP/1.1 *client* on a connection a worker opened.

:class:`ReverseHTTPClient` writes one request at a time and reads the
response with a small parser of its own (it replaced ``twisted.web._newclient``,
which cost about half of the hub's CPU per request).  It translates every
failure into one of the two outcomes the hub cares about:

* :class:`NotDelivered` -- the request cannot have reached the application
  (the connection was dead, died before the request was fully written, or
  was reset before a single response byte: see :func:`_reset_unread`), so
  the job may be put back at the head of the queue;
* :class:`WorkerFailed` -- the request was written and the worker failed
  afterwards (died, or sent malformed HTTP): the consumer gets a 502.

What the parser accepts from a worker: a status line ``HTTP/1.x NNN
reason``, header lines ending in CRLF or LF, a head of at most
:attr:`ReverseHTTPClient.MAX_RESPONSE_HEAD` bytes; 1xx responses other
than 101 are skipped; the body is framed by ``Transfer-Encoding: chunked``,
else ``Content-Length``, else by the close of the connection; HEAD
requests and 204/304 responses have none.  A connection is reused only
when the worker said ``Connection: keep-alive`` explicitly, the request
was fully written, and nothing followed the response (our worker sends
its retire notice -- 503 + ``Pothead-Requeue`` -- hard on the heels of
the last response, often in the same read).
"""

from __future__ import annotations

import re
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from ..fastwrite import write_now
from ..headers import CHUNK_SIZE, HOP_BY_HOP, TOKEN


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


#: Response headers about the connection or the framing: never passed on as
#: they are (the body is decoded and re-framed for the consumer).
_CONNECTION_CONTROL = HOP_BY_HOP | {b"content-length"}

_STATUS_LINE = re.compile(rb"\AHTTP/1\.([01]) ([0-9]{3})(?: (.*))?\Z")
#: A request line or header value may not carry these onto the worker hop.
_UNSAFE_IN_REQUEST = re.compile(rb"[\x00-\x1f\x7f ]")
_UNSAFE_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

#: Longest chunk-size or trailer line accepted.
_MAX_CHUNK_LINE = 4096

# Parser states.
_IDLE = 0  # no request outstanding
_HEAD = 1  # reading the status line and headers
_BODY = 2  # reading the body
_DONE = 3  # the response is complete (until the next send)


class WorkerResponse:
    """Status line and end-to-end headers of a worker's response."""

    __slots__ = ("code", "phrase", "headers", "length", "_client")

    def __init__(
        self,
        client: ReverseHTTPClient,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        self._client = client
        self.code = code
        self.phrase = phrase
        #: Headers to pass on: without connection-control headers and those
        #: that ``Connection`` names (RFC 9110 7.6.1).
        self.headers = headers
        #: The declared Content-Length, passed on to the consumer (for HEAD it
        #: describes the resource, not this empty body); None with
        #: Transfer-Encoding, whose body is decoded and re-framed.
        self.length = length

    def deliver(self, sink: BodySink) -> None:
        """Stream the body to ``sink`` (call exactly once)."""
        self._client._deliver(sink)


@implementer(IPushProducer)
class _BodyProducer:
    """
    Pauses and resumes reading from the worker for one response body
    (backpressure from the consumer).  Detached once the body is over, so a
    late pause cannot stall the connection's next job.
    """

    __slots__ = ("_transport", "_paused")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._paused = False

    def pauseProducing(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.abortConnection()

    def detach(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            if self._paused:
                transport.resumeProducing()


@implementer(IConsumer)
class _BodyWriter:
    """The consumer a request body producer writes into: the transport, counted."""

    def __init__(self, client: ReverseHTTPClient, transport: Any, length: int) -> None:
        self._client = client
        self._transport = transport
        self.remaining = length

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._client._writer is not self:
            return  # the connection is gone or the response already ended
        if len(data) > self.remaining:
            # Never past the declared length: the worker would read the
            # excess as another request.
            self._client._writer = None
            self._client._body = None
            self._client._fail_request(WorkerFailed("the request body was longer than its length"), abort=True)
            return
        self.remaining -= len(data)
        self._transport.write(data)


class ReverseHTTPClient:
    """
    An HTTP/1.1 client on one worker connection.

    ``attach`` it to the transport once the connection may carry requests
    (after any handshake); feed it ``dataReceived``/``connectionLost``.
    :attr:`reusable` is true once the last response completed and the
    connection may carry another request (see the module docstring).
    """

    #: Largest response head (status line and headers) a worker may send.
    MAX_RESPONSE_HEAD = 65536

    def __init__(self) -> None:
        self.transport: Any = None
        self.attached = False
        self.reusable = False
        self._state = _IDLE
        self._buffer = b""
        self._head_bytes = 0
        self._received = False
        self._head_request = False
        self._waiting: Deferred[WorkerResponse] | None = None
        # Request body being written, and whether the request is all out.
        self._body: IBodyProducer | None = None
        self._writer: _BodyWriter | None = None
        self._written = False
        # Response being read.
        self._keep_alive = False
        self._framing = 0  # 0 none, 1 content-length, 2 chunked, 3 until close
        self._remaining = 0
        self._chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._sink: BodySink | None = None
        self._producer: _BodyProducer | None = None
        self._pending = b""
        self._lost = False
        self._lost_reason: Failure | None = None

    def attach(self, transport: ITransport) -> None:
        self.attached = True
        self.transport = transport

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- writing the request ------------------------------------------------

    def send(
        self,
        method: bytes,
        uri: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
    ) -> Deferred[WorkerResponse]:
        """Write one request; fires with the response head, or fails with
        :class:`NotDelivered` / :class:`WorkerFailed`."""
        if self._lost or self.transport is None:
            return fail(NotDelivered("the connection is closed"))
        if self._state in (_HEAD, _BODY):
            return fail(NotDelivered("a request is already in progress on this connection"))
        if _UNSAFE_IN_REQUEST.search(method) or _UNSAFE_IN_REQUEST.search(uri) or not method or not uri:
            return fail(WorkerFailed(f"request could not be written: invalid method or target {method!r} {uri!r}"))
        lines = [b"%s %s HTTP/1.1\r\n" % (method, uri)]
        for name, value in headers:
            if not TOKEN.match(name) or _UNSAFE_IN_VALUE.search(value):
                return fail(WorkerFailed(f"request could not be written: invalid header {name!r}"))
            lines.append(b"%s: %s\r\n" % (name, value))
        length = getattr(body, "length", None) if body is not None else None
        if body is not None:
            if not isinstance(length, int):
                return fail(WorkerFailed("request could not be written: a body of unknown length"))
            lines.append(b"Content-Length: %d\r\n" % length)
        lines.append(b"\r\n")

        self.reusable = False
        self._state = _HEAD
        self._buffer = b""
        self._head_bytes = 0
        self._received = False
        self._head_request = method == b"HEAD"
        self._sink = None
        self._pending = b""
        waiting: Deferred[WorkerResponse] = Deferred()
        self._waiting = waiting
        write_now(self.transport, b"".join(lines))
        if body is None:
            self._written = True
        else:
            self._written = False
            self._send_body(body, length)  # type: ignore[arg-type]
        return waiting

    def _send_body(self, body: IBodyProducer, length: int) -> None:
        writer = _BodyWriter(self, self.transport, length)
        self._body = body
        self._writer = writer
        self.transport.registerProducer(body, True)
        try:
            finished = body.startProducing(writer)
        except Exception as e:
            self._writer = None
            self._body = None
            self.transport.unregisterProducer()
            self._fail_request(NotDelivered(f"the request body could not be read: {e}"), abort=True)
            return

        def sent(_: object) -> None:
            if self._writer is not writer:
                return
            self._writer = None
            self._body = None
            self.transport.unregisterProducer()
            if writer.remaining != 0:
                self._fail_request(WorkerFailed("the request body did not match its length"), abort=True)
                return
            self._written = True

        def failed(reason: Failure) -> None:
            if self._writer is not writer:
                return
            self._writer = None
            self._body = None
            self.transport.unregisterProducer()
            self._fail_request(NotDelivered(f"the request body could not be read: {reason.getErrorMessage()}"), abort=True)

        finished.addCallbacks(sent, failed)

    def _stop_body(self) -> None:
        """Stop writing the request body (the response is over, or the connection gone)."""
        body, self._body = self._body, None
        if body is not None:
            self._writer = None
            try:
                self.transport.unregisterProducer()
            except Exception:
                pass
            body.stopProducing()

    # -- reading the response -----------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not data:
            return
        if self._state == _BODY:
            if self._sink is None:
                self._pending += data
            else:
                self._feed(data)
            return
        if self._state == _HEAD:
            self._received = True
            self._head(data)
            return
        # A response is over (or none was asked for): the worker said more.
        # It can only be a retire notice; this connection is finished.
        self.reusable = False
        if self.transport is not None:
            self.transport.loseConnection()

    def _head(self, data: bytes) -> None:
        # Search only where the end of the head can be: a head that trickles
        # in byte by byte must not be rescanned from its start every time.
        start = max(0, len(self._buffer) - 2)
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\n\r\n", start)
            skip = 3
            end_lf = buffer.find(b"\n\n", start)
            if end_lf != -1 and (end == -1 or end_lf < end):
                end, skip = end_lf, 2
            if end == -1:
                if self._head_bytes + len(buffer) > self.MAX_RESPONSE_HEAD:
                    self._malformed(f"response head larger than {self.MAX_RESPONSE_HEAD} bytes")
                else:
                    self._buffer = buffer
                return
            head, rest = buffer[:end], buffer[end + skip :]
            self._head_bytes += end + skip
            if self._head_bytes > self.MAX_RESPONSE_HEAD:
                self._malformed(f"response head larger than {self.MAX_RESPONSE_HEAD} bytes")
                return
            self._buffer = b""
            if not self._parse_head(head, rest):
                # Malformed, or the final response: its callbacks may already
                # have sent the next request on this connection.
                return
            # A skipped 1xx response: the real one follows.
            buffer = rest
            start = 0
            if not buffer:
                return

    def _parse_head(self, head: bytes, rest: bytes) -> bool:
        """
        Parse one response head; ``rest`` is what followed it (body bytes).
        True only for a skipped informational (1xx) response.
        """
        lines = head.split(b"\n")
        status = lines[0].rstrip(b"\r")
        match = _STATUS_LINE.match(status)
        if match is None:
            self._malformed(f"invalid status line {status[:80]!r}")
            return False
        minor, code_text, phrase = match.groups()
        code = int(code_text)
        if code < 100:
            self._malformed(f"invalid status code {code}")
            return False
        raw: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            name, colon, value = line.partition(b":")
            if not colon or not TOKEN.match(name):
                self._malformed(f"invalid response header line {line[:80]!r}")
                return False
            raw.append((name, value.strip(b" \t")))
        if 100 <= code < 200 and code != 101:
            return True  # informational: skip it, stay in _HEAD
        if code == 101:
            self._malformed("the worker switched protocols (101), which the hub does not relay")
            return False

        tokens: set[bytes] = set()
        lengths: list[bytes] = []
        encodings: list[bytes] = []
        for name, value in raw:
            lowered = name.lower()
            if lowered == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
            elif lowered == b"content-length":
                lengths.extend(v.strip() for v in value.split(b","))
            elif lowered == b"transfer-encoding":
                encodings.extend(v.strip().lower() for v in value.split(b",") if v.strip())
        headers = [
            (name, value)
            for name, value in raw
            if (lowered := name.lower()) not in _CONNECTION_CONTROL and lowered not in tokens
        ]

        length: int | None = None
        if lengths and not encodings:
            if any(not v.isdigit() for v in lengths) or len(set(lengths)) != 1:
                self._malformed(f"invalid Content-Length {b', '.join(lengths)[:80]!r}")
                return False
            length = int(lengths[0])

        self._keep_alive = b"keep-alive" in tokens and b"close" not in tokens
        if self._head_request or code in (204, 304):
            self._framing = 0
        elif encodings:
            if encodings[-1] != b"chunked":
                # Only the close can end a body in an encoding we do not decode.
                self._framing = 3
                self._keep_alive = False
            else:
                if encodings != [b"chunked"]:
                    self._malformed(f"unsupported Transfer-Encoding {b', '.join(encodings)!r}")
                    return False
                self._framing = 2
                self._chunk_state = 0
        elif length is not None:
            self._framing = 1
            self._remaining = length
        else:
            self._framing = 3
            self._keep_alive = False

        self._state = _BODY
        # Kept for deliver(), which the callback normally calls at once.
        self._pending = rest
        response = WorkerResponse(self, code, phrase or b"", headers, length)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(response)
        return False

    def _deliver(self, sink: BodySink) -> None:
        if self._sink is not None:
            raise RuntimeError("deliver() called twice")
        self._sink = sink
        if self._state != _BODY:
            raise RuntimeError("deliver() called without a response")
        self._producer = _BodyProducer(self.transport)
        sink.body_started(self._producer)
        pending, self._pending = self._pending, b""
        if self._framing == 0 or (self._framing == 1 and self._remaining == 0):
            self._finish(pending)
            return
        if pending:
            self._feed(pending)
        if self._lost and self._state == _BODY:
            # The connection closed before deliver() was called.
            self._body_lost()

    def _feed(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None
        framing = self._framing
        if framing == 1:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                sink.body_data(data)
                return
            if remaining:
                sink.body_data(data[:remaining])
            self._remaining = 0
            self._finish(data[remaining:])
        elif framing == 3:
            sink.body_data(data)
        elif framing == 2:
            self._feed_chunked(data)
        else:
            self._finish(data)

    def _feed_chunked(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buffer:
            state = self._chunk_state
            if state == 1:
                n = self._remaining
                if len(buffer) < n:
                    self._remaining = n - len(buffer)
                    sink.body_data(buffer)
                    return
                sink.body_data(buffer[:n])
                buffer = buffer[n:]
                self._chunk_state = 2
                continue
            end = buffer.find(b"\n")
            if end == -1:
                if len(buffer) > _MAX_CHUNK_LINE:
                    self._body_malformed("chunk line too long")
                    return
                self._buffer = buffer
                return
            line, buffer = buffer[:end].rstrip(b"\r"), buffer[end + 1 :]
            if state == 2:
                if line:
                    self._body_malformed("no CRLF after chunk data")
                    return
                self._chunk_state = 0
            elif state == 0:
                size = line.split(b";", 1)[0].strip()
                if not CHUNK_SIZE.match(size):
                    self._body_malformed(f"invalid chunk size {size[:40]!r}")
                    return
                n = int(size, 16)
                if n == 0:
                    self._chunk_state = 3
                else:
                    self._remaining = n
                    self._chunk_state = 1
            else:  # trailers (dropped), until the empty line
                if not line:
                    self._finish(buffer)
                    return

    def _finish(self, rest: bytes) -> None:
        """The response body is complete; ``rest`` arrived after it."""
        sink = self._sink
        self._state = _DONE
        self._buffer = b""
        if self._producer is not None:
            self._producer.detach()
            self._producer = None
        if self._body is not None:
            # The worker answered before reading the whole request body.
            self._stop_body()
        self.reusable = self._keep_alive and self._written and not rest and not self._lost
        if not self.reusable and self.transport is not None and not self._lost:
            self.transport.loseConnection()
        if sink is not None:
            sink.body_done()

    def _malformed(self, why: str) -> None:
        """The response head is unusable: 502, and the connection is dropped."""
        self._state = _DONE
        self._buffer = b""
        self.reusable = False
        waiting, self._waiting = self._waiting, None
        self._stop_body()
        if self.transport is not None:
            self.transport.abortConnection()
        if waiting is not None:
            waiting.errback(WorkerFailed(why))

    def _body_malformed(self, why: str) -> None:
        self._state = _DONE
        self._buffer = b""
        self.reusable = False
        self._stop_body()
        if self._producer is not None:
            self._producer.detach()
            self._producer = None
        if self.transport is not None:
            self.transport.abortConnection()
        if self._sink is not None:
            self._sink.body_failed(Failure(WorkerFailed(f"malformed response body: {why}")))

    def _fail_request(self, error: Exception, *, abort: bool) -> None:
        """Writing the request failed: fail the response wait, if still open."""
        waiting, self._waiting = self._waiting, None
        if abort and self.transport is not None:
            self.transport.abortConnection()
        if waiting is not None:
            self._state = _DONE
            waiting.errback(error)

    # -- the connection ends --------------------------------------------------

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self._lost_reason = reason
        self.reusable = False
        self._stop_body()
        state = self._state
        if state == _HEAD:
            self._state = _DONE
            waiting, self._waiting = self._waiting, None
            if waiting is None:
                return
            why = _describe(reason)
            if not self._written:
                waiting.errback(NotDelivered(f"connection lost while the request was being written ({why})"))
            elif not self._received and _reset_unread(reason):
                waiting.errback(NotDelivered(f"worker reset the connection without reading the request ({why})"))
            elif self._received:
                waiting.errback(WorkerFailed(f"connection lost in the middle of the response head ({why})"))
            else:
                waiting.errback(WorkerFailed(f"connection closed before any response ({why})"))
        elif state == _BODY and self._sink is not None:
            self._body_lost(reason)
        # _BODY without a sink yet: _deliver reports it.

    def _body_lost(self, reason: Failure | None = None) -> None:
        sink = self._sink
        assert sink is not None
        if self._producer is not None:
            self._producer.detach()
            self._producer = None
        if reason is None:
            reason = self._lost_reason
        if self._framing == 3 and (reason is None or reason.check(ConnectionDone)):
            # A close-delimited body: a clean close *is* its end (a reset is
            # not: the worker died mid-body).
            self._state = _DONE
            sink.body_done()
            return
        self._state = _DONE
        why = _describe(reason) if reason is not None else "connection lost"
        sink.body_failed(Failure(WorkerFailed(f"the worker connection closed mid-body ({why})")))


def _reset_unread(reason: Failure) -> bool:
    """
    True when the worker's side *reset* the connection: a process that dies
    (SIGKILL, crash) with unread bytes in its socket makes its kernel send
    RST instead of FIN.  Our worker reads the whole request before the app
    starts, so a reset with no response means the job never ran: it is
    requeued, not answered 502.  A clean close (FIN) after the request was
    written stays a 502 -- the worker may have read it.
    """
    return bool(reason.check(ConnectionLost)) and not reason.check(ConnectionDone)


def _describe(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    return reason.getErrorMessage() or reason.type.__name__
