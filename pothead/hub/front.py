"""
The consumer port's HTTP/1.1 server: a small, strict protocol of its own.

It replaced twisted.web's ``HTTPChannel``/``Request`` on this port, where a
queued request cost ~8 KB of Python objects and ~35 µs of parsing; here a
request is one :class:`ConsumerRequest` with slots, a list of header tuples
and, if it has a body, a spool file.  The hub only forwards, so it needs no
resource tree, no form parsing and no query arguments.

What it accepts (anything else is refused with a status and a close, before
a job exists -- a lenient parse could let a request be read differently by a
proxy in front, i.e. request smuggling):

* lines end in CRLF (a bare LF is 400); no obs-fold (400); header names are
  tokens and values free of control characters (400); one empty line before
  a request line is ignored;
* ``HTTP/1.0`` and ``HTTP/1.1``; a request line longer than
  ``--max-header-bytes`` is 414, a longer head 431, more than
  :data:`MAX_HEADERS` header lines 431;
* ``Content-Length`` once, digits only; ``Transfer-Encoding`` exactly one
  ``chunked`` on HTTP/1.1 (other codings 501), never together with
  ``Content-Length``; a body beyond ``--max-body`` is 413 as soon as its
  length (or a chunk size) says so;
* ``Expect: 100-continue`` is answered before the body is read.

Bodies are spooled (memory up to 100 kB, a temporary file beyond), so a
slow uploader never holds a worker.  Requests on one connection are
answered in order; a pipelined request waits, with reading paused, until
the previous response is finished.  Timeouts are checked by one timer for
all connections: ``--header-timeout`` from a head's first byte (408), and
``--consumer-timeout`` for an idle connection or a stalled upload.
"""

from __future__ import annotations

import tempfile
import time
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, Callable

from twisted.internet.interfaces import IAddress, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from ..fastwrite import write_now
from ..headers import CHUNK_SIZE, TOKEN

if TYPE_CHECKING:
    from .dispatch import Hub

#: Most header lines one request may have.
MAX_HEADERS = 500
#: Bodies up to this size are spooled in memory, larger ones to a temporary file.
MEMORY_BODY = 100_000
#: Longest chunk-size or trailer line of a chunked request body.
MAX_CHUNK_LINE = 4096

_CTL = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
_TARGET_CTL = bytes(range(0x00, 0x21)) + b"\x7f"
#: Reason phrases twisted.web's table lacks.
_PHRASES = {**RESPONSES, 431: b"Request Header Fields Too Large"}

# Connection phases.
_IDLE = 0  # no byte of a request yet
_HEAD = 1  # part of a request head
_BODY = 2  # reading a request body
_BUSY = 3  # the request is complete; its response is on its way
_CLOSED = 4


class _Refusal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _DateCache:
    """The ``Date`` header value, computed once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second)).encode("ascii")
        return self._value


_date = _DateCache()


class ConsumerRequest:
    """One consumer request and its response, as :class:`~pothead.hub.consumer.ProxyJob` sees it."""

    __slots__ = (
        "channel",
        "method",
        "uri",
        "clientproto",
        "headers",
        "content",
        "code",
        "phrase",
        "response_headers",
        "started_writing",
        "finished",
        "on_lost",
        "_chunked",
        "_no_body",
    )

    def __init__(
        self,
        channel: ConsumerProtocol,
        method: bytes,
        uri: bytes,
        clientproto: bytes,
        headers: list[tuple[bytes, bytes]],
        content: IO[bytes] | None,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.clientproto = clientproto
        #: (name, value) as received, in order; names keep their case.
        self.headers = headers
        #: The spooled body, or None when the request has none.
        self.content = content
        self.code = 200
        self.phrase: bytes | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.started_writing = False
        self.finished = False
        #: Called once (with a Failure) if the consumer goes before the response is finished.
        self.on_lost: Callable[[Failure], None] | None = None
        self._chunked = False
        self._no_body = False

    # -- the request --------------------------------------------------------

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name`` (lower case), or None."""
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def header_count(self, name: bytes) -> int:
        return sum(1 for n, _ in self.headers if n.lower() == name)

    def set_request_header(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` (lower case) request header by one."""
        self.headers = [(n, v) for n, v in self.headers if n.lower() != name] + [(name, value)]

    def client_host(self) -> str | None:
        return getattr(self.channel.transport.getPeer(), "host", None)

    def local_address(self) -> IAddress:
        return self.channel.transport.getHost()

    def is_secure(self) -> bool:
        return ISSLTransport.providedBy(self.channel.transport)

    # -- the response -------------------------------------------------------

    def set_response_code(self, code: int, phrase: bytes | None = None) -> None:
        self.code = code
        self.phrase = phrase

    def remove_response_header(self, name: bytes) -> None:
        self.response_headers = [(n, v) for n, v in self.response_headers if n.lower() != name]

    def set_response_header(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` (lower case) response header by one."""
        self.remove_response_header(name)
        self.response_headers.append((name, value))

    def add_response_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.append((name, value))

    def close_after(self) -> None:
        """Close the connection after this response."""
        self.channel.persistent = False

    def register_producer(self, producer: Any) -> None:
        if not self.channel.lost:
            self.channel.transport.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if not self.channel.lost:
            self.channel.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self.finished or self.channel.lost:
            return
        if not self.started_writing:
            self._write_head(data)
            return
        if not data or self._no_body:
            return
        if self._chunked:
            write_now(self.channel.transport, b"%x\r\n%s\r\n" % (len(data), data))
        else:
            write_now(self.channel.transport, data)

    def _write_head(self, data: bytes) -> None:
        self.started_writing = True
        channel = self.channel
        code = self.code
        phrase = self.phrase if self.phrase is not None else _PHRASES.get(code, b"Unknown")
        lines = [b"%s %d %s\r\n" % (self.clientproto, code, phrase)]
        has_length = has_date = False
        for name, value in self.response_headers:
            lowered = name.lower()
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"date":
                has_date = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            lines.append(b"Date: %s\r\n" % _date())
        self._no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        if not has_length and not self._no_body:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                channel.persistent = False  # the close ends the body
        if not channel.persistent:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if data and not self._no_body:
            lines.append(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        write_now(channel.transport, b"".join(lines))

    def finish(self) -> None:
        if self.finished:
            return
        if not self.started_writing:
            self._write_head(b"")
        self.finished = True
        if self._chunked and not self.channel.lost:
            write_now(self.channel.transport, b"0\r\n\r\n")
        self.channel.request_done(self)

    def abort(self) -> None:
        """Cut the consumer off (a truncated response must not look complete)."""
        self.channel.transport.abortConnection()


class ConsumerProtocol(Protocol):
    """One consumer connection."""

    _log = Logger()
    #: A TCP (or TLS) transport once connected.
    transport: Any

    def __init__(self, site: ConsumerSite) -> None:
        self.site = site
        self.persistent = True
        self.lost = False
        self.request: ConsumerRequest | None = None
        self._buffer = b""
        self._phase = _IDLE
        self._since = 0.0  # when the phase began (_IDLE, _HEAD) or data last came (_BODY)
        self._paused = False
        self._refused = False
        self._parsing = False
        self._empty_lines = 0
        # The request being read.
        self._head: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]] | None = None
        self._content: IO[bytes] | None = None
        self._remaining = 0  # Content-Length bytes still to read
        self._chunked = False
        self._chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._received = 0

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._since = self.site.clock.seconds()
        self.site.connection_opened(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = True
        self._phase = _CLOSED
        self.site.connection_closed(self)
        request, self.request = self.request, None
        if request is not None and not request.finished and request.on_lost is not None:
            on_lost, request.on_lost = request.on_lost, None
            on_lost(reason)
        if self._content is not None:
            self._content.close()
            self._content = None

    def loseConnection(self) -> None:
        """Close after the response in progress, if any (the hub's drain)."""
        self.persistent = False
        if self.request is None:
            self.transport.loseConnection()

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self.lost:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if self._phase == _BUSY:
            # A pipelined request: it waits for the response in progress;
            # stop reading so it cannot pile up.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        if self._phase == _BODY:
            self._since = self.site.clock.seconds()
        self._parse()

    def _parse(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            while self._buffer and not self._refused and not self.lost:
                phase = self._phase
                if phase == _IDLE or phase == _HEAD:
                    if not self._read_head():
                        return
                elif phase == _BODY:
                    if not self._read_body():
                        return
                else:
                    return
        except _Refusal as refusal:
            self.refuse(refusal.code, refusal.message)
        finally:
            self._parsing = False
            if self._phase == _BUSY and self._buffer and not self._paused and not self.lost:
                # A pipelined request came with this one: stop reading until it is our turn.
                self._paused = True
                self.transport.pauseProducing()

    def _read_head(self) -> bool:
        buffer = self._buffer
        if self._phase == _IDLE:
            # One empty line before a request line is tolerated (RFC 9112 2.2).
            while buffer.startswith(b"\r\n") and self._empty_lines < 1:
                buffer = buffer[2:]
                self._empty_lines += 1
            self._buffer = buffer
            if not buffer or (buffer == b"\r" and self._empty_lines < 1):
                return False  # (the CR may begin a tolerated empty line)
            self._phase = _HEAD
            self._since = self.site.clock.seconds()
            self.site.watch()
        end = buffer.find(b"\r\n\r\n")
        limit = self.site.max_header_bytes
        if end == -1:
            if b"\n" in buffer.replace(b"\r\n", b""):
                raise _Refusal(400, "line not ended by CRLF (bare LF)")
            first = buffer.find(b"\r\n")
            if (len(buffer) if first == -1 else first) > limit:
                raise _Refusal(414, "request line too long")
            if len(buffer) > limit + 4:
                raise _Refusal(431, f"request header block larger than {limit} bytes")
            return False
        head, self._buffer = buffer[:end], buffer[end + 4 :]
        self._empty_lines = 0
        if b"\n" in head.replace(b"\r\n", b""):
            raise _Refusal(400, "line not ended by CRLF (bare LF)")
        lines = head.split(b"\r\n")
        if len(lines[0]) > limit:
            raise _Refusal(414, "request line too long")
        if len(head) > limit:
            raise _Refusal(431, f"request header block larger than {limit} bytes")
        if len(lines) - 1 > MAX_HEADERS:
            raise _Refusal(431, f"more than {MAX_HEADERS} request headers")
        self._start_request(lines)
        return True

    def _start_request(self, lines: list[bytes]) -> None:
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Refusal(400, "malformed request line")
        method, target, version = parts
        if not TOKEN.match(method):
            raise _Refusal(400, "malformed request line")
        if not target or target != target.translate(None, _TARGET_CTL):
            raise _Refusal(400, "malformed request target")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refusal(505 if version.startswith(b"HTTP/") else 400, "unsupported HTTP version")
        headers: list[tuple[bytes, bytes]] = []
        lengths: list[bytes] = []
        encodings = 0
        expect_continue = False
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise _Refusal(400, "obsolete line folding or leading whitespace")
            name, colon, value = line.partition(b":")
            if not colon or not TOKEN.match(name):
                raise _Refusal(400, "invalid header name")
            value = value.strip(b" \t")
            if value != value.translate(None, _CTL):
                raise _Refusal(400, "control character in a header value")
            lowered = name.lower()
            if lowered == b"content-length":
                lengths.append(value)
            elif lowered == b"transfer-encoding":
                encodings += 1
                codings = [c.strip().lower() for c in value.split(b",")]
                if any(c != b"chunked" for c in codings):
                    raise _Refusal(501, "only Transfer-Encoding: chunked is supported")
                if encodings > 1 or len(codings) > 1:
                    raise _Refusal(400, "Transfer-Encoding: chunked given more than once")
                if version != b"HTTP/1.1":
                    raise _Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
            elif lowered == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
            headers.append((name, value))
        max_body = self.site.max_body
        if encodings and lengths:
            raise _Refusal(400, "both Content-Length and Transfer-Encoding")
        if len(lengths) > 1:
            raise _Refusal(400, "more than one Content-Length")
        self._head = (method, target, version, headers)
        self._chunked = bool(encodings)
        self._received = 0
        if lengths:
            if not lengths[0].isdigit():
                raise _Refusal(400, "invalid Content-Length")
            length = int(lengths[0])
            if length > max_body:
                raise _Refusal(413, f"request body larger than {max_body} bytes")
            self._remaining = length
            self._content = BytesIO() if length <= MEMORY_BODY else tempfile.TemporaryFile()
        elif self._chunked:
            self._chunk_state = 0
            self._content = BytesIO()  # moved to a file past MEMORY_BODY
        else:
            self._content = None
            self._complete()
            return
        if expect_continue and version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._phase = _BODY
        self._since = self.site.clock.seconds()
        if not self._chunked and self._remaining == 0:
            self._complete()

    def _read_body(self) -> bool:
        content = self._content
        assert content is not None
        buffer, self._buffer = self._buffer, b""
        if not self._chunked:
            n = self._remaining
            if len(buffer) < n:
                content.write(buffer)
                self._remaining = n - len(buffer)
                return False
            content.write(buffer[:n])
            self._remaining = 0
            self._buffer = buffer[n:]
            self._complete()
            return True
        max_body = self.site.max_body
        while buffer:
            state = self._chunk_state
            if state == 1:
                n = self._remaining
                if len(buffer) < n:
                    self._spool(buffer)
                    self._remaining = n - len(buffer)
                    return False
                self._spool(buffer[:n])
                buffer = buffer[n:]
                self._chunk_state = 2
                continue
            end = buffer.find(b"\r\n")
            if end == -1:
                if b"\n" in buffer or len(buffer) > MAX_CHUNK_LINE:
                    raise _Refusal(400, "malformed chunked body")
                self._buffer = buffer
                return False
            line, buffer = buffer[:end], buffer[end + 2 :]
            if b"\n" in line or b"\r" in line:
                raise _Refusal(400, "malformed chunked body (bare CR or LF)")
            if state == 2:
                if line:
                    raise _Refusal(400, "malformed chunked body (no CRLF after a chunk)")
                self._chunk_state = 0
            elif state == 0:
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not CHUNK_SIZE.match(size):
                    raise _Refusal(400, "malformed chunk size")
                n = int(size, 16)
                self._received += n
                if self._received > max_body:
                    raise _Refusal(413, f"request body larger than {max_body} bytes")
                if n == 0:
                    self._chunk_state = 3
                else:
                    self._remaining = n
                    self._chunk_state = 1
            else:  # trailers, dropped, until the empty line
                if not line:
                    self._buffer = buffer
                    self._complete()
                    return True
                if len(line) > MAX_CHUNK_LINE:
                    raise _Refusal(400, "trailer line too long")
        return False

    def _spool(self, data: bytes) -> None:
        """Append to a chunked body: in memory up to MEMORY_BODY, then in a temporary file."""
        content = self._content
        assert content is not None
        if isinstance(content, BytesIO) and content.tell() + len(data) > MEMORY_BODY:
            spill = tempfile.TemporaryFile()
            spill.write(content.getbuffer())
            content.close()
            self._content = content = spill
        content.write(data)

    def _complete(self) -> None:
        """The request is fully read: hand it to the hub."""
        head, self._head = self._head, None
        assert head is not None
        method, target, version, headers = head
        content, self._content = self._content, None
        if content is not None:
            content.seek(0)
        if version == b"HTTP/1.0":
            self.persistent = False
        else:
            for name, value in headers:
                if name.lower() == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
                    self.persistent = False
        self._phase = _BUSY
        request = ConsumerRequest(self, method, target, version, headers, content)
        self.request = request
        self.site.handle(request)

    def request_done(self, request: ConsumerRequest) -> None:
        """The response to ``request`` is written: next request, or close."""
        if request is not self.request:
            return
        self.request = None
        if request.content is not None:
            request.content.close()
        if self.lost:
            return
        if not self.persistent:
            self._phase = _CLOSED
            self.transport.loseConnection()
            return
        self._phase = _IDLE
        self._since = self.site.clock.seconds()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._buffer:
            self._parse()

    # -- timeouts (called by the site's timer) -----------------------------------

    def check_timeouts(self, now: float) -> None:
        phase = self._phase
        site = self.site
        if phase == _HEAD and site.header_timeout is not None and now - self._since >= site.header_timeout:
            self.refuse(408, f"request head not received within {site.header_timeout:g}s")
        elif (
            phase in (_IDLE, _HEAD, _BODY)
            and site.idle_timeout is not None
            and now - self._since >= site.idle_timeout
        ):
            self._phase = _CLOSED
            self.transport.loseConnection()

    # -- refusals -------------------------------------------------------------

    def refuse(self, code: int, message: str) -> None:
        """Answer a request that is not acceptable, before a job exists, and close."""
        if self._refused or self.lost:
            return
        self._refused = True
        self._phase = _CLOSED
        self._buffer = b""
        if self._content is not None:
            self._content.close()
            self._content = None
        reason = {
            408: "header_timeout",
            413: "body_too_large",
            414: "uri_too_long",
            431: "headers_too_large",
            501: "not_implemented",
            505: "bad_request",
        }.get(code, "bad_request")
        site = self.site
        site.hub.emit("rejected", reason=reason, status=code, job=False)
        self._log.info(
            "[-] {code} refused before the request was complete: {message} (client {client})",
            code=code,
            message=message,
            client=getattr(self.transport.getPeer(), "host", "?"),
            status=code,
            access=True,
        )
        body = f"{code} {_PHRASES.get(code, b'').decode()}: {message}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, _PHRASES.get(code, b"Error"), len(body), body)
        )
        self.transport.loseConnection()


class _TooManyConnections(Protocol):
    """Answers a connection over ``--max-connections`` with a 503 and closes it."""

    BODY = b"503 Service Unavailable: too many connections\n"
    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(self.BODY), self.BODY)
        )
        self.transport.loseConnection()


class ConsumerSite(Factory):
    """The consumer port: builds a :class:`ConsumerProtocol` per connection."""

    noisy = False

    def __init__(self, hub: Hub, handle: Callable[[ConsumerRequest], None] | None = None) -> None:
        self.hub = hub
        self.clock = hub.clock
        config = hub.config
        self.max_body = config.max_body
        self.max_header_bytes = config.max_header_bytes
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.consumer_idle_timeout
        self.max_connections = config.max_connections
        self.connections_refused = 0
        #: Open consumer connections, closed gracefully at the end of a drain.
        self.channels: set[ConsumerProtocol] = set()
        self._handle = handle
        self._timer: Any = None

    def handle(self, request: ConsumerRequest) -> None:
        if self._handle is None:
            from .consumer import handle_request

            self._handle = handle_request
        self._handle(request)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self.max_connections is not None and len(self.channels) >= self.max_connections:
            # Over the cap: a 503 costs one write, then the connection goes.
            self.connections_refused += 1
            self.hub.emit("rejected", reason="too_many_connections", status=503, job=False)
            return _TooManyConnections()
        return ConsumerProtocol(self)

    def connection_opened(self, channel: ConsumerProtocol) -> None:
        self.channels.add(channel)
        if ITCPTransport.providedBy(channel.transport):
            # Small responses go out at once rather than waiting for an ACK.
            try:
                channel.transport.setTcpNoDelay(True)
            except OSError:
                pass
        self.watch()

    def connection_closed(self, channel: ConsumerProtocol) -> None:
        self.channels.discard(channel)

    # -- one timer for every connection's timeouts ----------------------------

    def _interval(self) -> float | None:
        timeouts = [t for t in (self.header_timeout, self.idle_timeout) if t is not None]
        if not timeouts:
            return None
        return max(0.02, min(1.0, min(timeouts) / 4))

    def watch(self) -> None:
        """Make sure the timeout check runs while there are connections."""
        if self._timer is None and self.channels:
            interval = self._interval()
            if interval is not None:
                self._timer = self.clock.callLater(interval, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        for channel in list(self.channels):
            channel.check_timeouts(now)
        self.watch()

    def stop_watching(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close_connections(self, clock: Any, grace: float) -> Any:
        """
        Close every consumer connection after its response in progress; abort
        those still open after ``grace`` seconds.  Without this the reactor's
        shutdown would cut off the last responses of a drain.
        """
        from twisted.internet.defer import Deferred

        done: Deferred[None] = Deferred()
        for channel in list(self.channels):
            channel.loseConnection()

        def check(deadline: float) -> None:
            if not self.channels or clock.seconds() >= deadline:
                for channel in list(self.channels):
                    channel.transport.abortConnection()
                self.stop_watching()
                done.callback(None)
            else:
                clock.callLater(0.02, check, deadline)

        check(clock.seconds() + grace)
        return done
