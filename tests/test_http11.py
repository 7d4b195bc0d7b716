"""
Unit tests of :class:`pothead.hub._http11.ReverseHTTPClient`, the hub's
HTTP/1.1 client on a connection a worker opened.

No reactor and no sockets: the client writes into a ``StringTransport``
(``disconnecting`` once closed, ``disconnected`` too once aborted) and the
tests play the worker by calling ``dataReceived``/``connectionLost`` by hand.
A recording :class:`Sink` stands in for ``ProxyJob`` (the BodySink); like
``ProxyJob._got_response``, :class:`Exchange` calls ``response.deliver``
synchronously in the Deferred's callback unless a test asks otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from pothead.hub._http11 import NotDelivered, ReverseHTTPClient, WorkerFailed, WorkerResponse

pytestmark = pytest.mark.no_reactor

OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
RETIRE_NOTICE = b"HTTP/1.1 503 Service Unavailable\r\nPothead-Requeue: 1\r\nContent-Length: 0\r\n\r\n"


# -- doubles ------------------------------------------------------------------


class Sink:
    """A BodySink that records what it is told."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self.producer: Any = None
        self.data = b""
        self.events: list[str] = []
        self.failure: Failure | None = None
        self._on_done = on_done

    def body_started(self, producer: Any) -> None:
        self.producer = producer
        self.events.append("started")

    def body_data(self, data: bytes) -> None:
        assert self.events == ["started"], "body_data outside started..done"
        self.data += data

    def body_done(self) -> None:
        self.events.append("done")
        if self._on_done is not None:
            self._on_done()

    def body_failed(self, reason: Failure) -> None:
        self.failure = reason
        self.events.append("failed")


class Exchange:
    """One request sent on the client, and what became of it."""

    def __init__(
        self,
        client: ReverseHTTPClient,
        method: bytes = b"GET",
        uri: bytes = b"/",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: Any = None,
        deliver: bool = True,
        sink: Sink | None = None,
    ) -> None:
        self.sink = sink or Sink()
        self.response: WorkerResponse | None = None
        self.failure: Failure | None = None
        self._deliver = deliver
        client.send(method, uri, headers or [], body).addCallbacks(self._got, self._failed)

    def _got(self, response: WorkerResponse) -> None:
        self.response = response
        if self._deliver:
            response.deliver(self.sink)

    def _failed(self, failure: Failure) -> None:
        self.failure = failure

    def failed_with(self) -> type:
        assert self.response is None and self.failure is not None
        return self.failure.type  # type: ignore[return-value]


@implementer(IBodyProducer)
class WholeBody:
    """A request body written at once, in startProducing."""

    def __init__(self, data: bytes, length: Any = None) -> None:
        self.data = data
        self.length = len(data) if length is None else length
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None:
        self.stopped = True


class SlowBody(WholeBody):
    """A request body still being written: 3 bytes now, the rest on ``finish()``."""

    def __init__(self, data: bytes = b"0123456789") -> None:
        super().__init__(data)
        self.consumer: Any = None
        self.finished: Deferred[None] = Deferred()

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        consumer.write(self.data[:3])
        return self.finished

    def finish(self) -> None:
        self.consumer.write(self.data[3:])
        self.finished.callback(None)


def connect() -> tuple[ReverseHTTPClient, StringTransport]:
    client = ReverseHTTPClient()
    transport = StringTransport(lenient=True)  # resuming a closed transport is harmless
    client.attach(transport)
    return client, transport


def feed(client: ReverseHTTPClient, *reads: bytes) -> None:
    for data in reads:
        client.dataReceived(data)


# -- writing the request ------------------------------------------------------


def test_request_with_body_is_serialised_with_content_length() -> None:
    client, transport = connect()
    Exchange(client, b"POST", b"/x?y=1", [(b"Host", b"w"), (b"X-A", b"1"), (b"X-A", b"2\tb")], WholeBody(b"hello"))
    assert transport.value() == (
        b"POST /x?y=1 HTTP/1.1\r\nHost: w\r\nX-A: 1\r\nX-A: 2\tb\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert transport.producer is None, "the body producer is unregistered once written"


@pytest.mark.parametrize("body, length", [(None, b""), (WholeBody(b""), b"Content-Length: 0\r\n")], ids=["none", "empty"])
def test_content_length_only_with_a_body(body: Any, length: bytes) -> None:
    client, transport = connect()
    Exchange(client, b"GET", b"/", [(b"Host", b"w")], body)
    assert transport.value() == b"GET / HTTP/1.1\r\nHost: w\r\n" + length + b"\r\n"


@pytest.mark.parametrize(
    "method, uri, headers, length",
    [
        (b"GE T", b"/", [], None), (b"", b"/", [], None), (b"GET", b"/a b", [], None), (b"GET", b"", [], None),
        (b"GET", b"/a\r\nX: y", [], None), (b"GET", b"/", [(b"Bad Name", b"v")], None),
        (b"GET", b"/", [(b"Bad:Name", b"v")], None), (b"GET", b"/", [(b"", b"v")], None),
        (b"GET", b"/", [(b"X", b"a\r\nInjected: 1")], None), (b"GET", b"/", [(b"X", b"a\nb")], None),
        (b"GET", b"/", [(b"X", b"a\x00b")], None), (b"POST", b"/", [], UNKNOWN_LENGTH),
    ],
)  # fmt: skip
def test_invalid_request_fails_with_worker_failed_and_writes_nothing(
    method: bytes, uri: bytes, headers: Any, length: Any
) -> None:
    client, transport = connect()
    exchange = Exchange(client, method, uri, headers, WholeBody(b"body", length))
    assert exchange.failed_with() is WorkerFailed
    assert transport.value() == b""
    Exchange(client)  # the connection is still usable
    assert transport.value() == b"GET / HTTP/1.1\r\n\r\n"


def test_send_on_a_lost_or_busy_connection_is_not_delivered() -> None:
    client, transport = connect()
    Exchange(client)
    written = transport.value()
    assert Exchange(client).failed_with() is NotDelivered  # a request is in progress
    assert transport.value() == written
    client.connectionLost(Failure(ConnectionDone()))
    assert Exchange(client).failed_with() is NotDelivered
    assert Exchange(ReverseHTTPClient()).failed_with() is NotDelivered  # never attached


def test_request_body_raising_in_start_producing_fails_the_deferred() -> None:
    client, transport = connect()
    body = WholeBody(b"abc")
    body.startProducing = lambda consumer: 1 / 0  # type: ignore[method-assign]
    exchange = Exchange(client, b"POST", b"/", [], body)
    assert exchange.failed_with() in (NotDelivered, WorkerFailed)
    assert transport.disconnected


def test_request_body_failing_is_not_delivered_and_aborts() -> None:
    client, transport = connect()
    body = SlowBody()
    exchange = Exchange(client, b"POST", b"/", [], body)
    body.finished.errback(OSError("spool file unreadable"))
    assert exchange.failed_with() is NotDelivered
    assert transport.disconnected


def test_request_body_shorter_than_its_length_fails_and_aborts() -> None:
    client, transport = connect()
    exchange = Exchange(client, b"POST", b"/", [], WholeBody(b"abc", length=5))
    assert exchange.failed_with() is WorkerFailed
    assert transport.disconnected


def test_request_body_longer_than_its_length_is_never_written_past_it() -> None:
    # The worker would read the excess as a second, pipelined request.
    client, transport = connect()
    exchange = Exchange(client, b"POST", b"/", [], WholeBody(b"abcGET /smuggled HTTP/1.1\r\n\r\n", length=3))
    assert exchange.failed_with() is WorkerFailed
    assert transport.disconnected
    assert transport.value().startswith(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
    assert len(transport.value()) <= len(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")


# -- response framing and reuse ----------------------------------------------------

#: Complete keep-alive responses and their decoded bodies.
REUSABLE = {
    "content-length": (OK_KEEP_ALIVE, b"hello"),
    "chunked": (CHUNKED, b"hello world"),
    "chunked-lf": (b"HTTP/1.1 200 OK\nConnection: keep-alive\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n", b"abc"),
    "http-1.0": (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "repeated-length": (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc", b"abc"),
    "after-100": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n" + OK_KEEP_ALIVE, b"hello"),
}


def splits(message: bytes) -> list[list[bytes]]:
    """The message in one read, byte by byte, and in two reads split at every position."""
    return [[message], [message[i : i + 1] for i in range(len(message))]] + [
        [message[:i], message[i:]] for i in range(1, len(message))
    ]


@pytest.mark.parametrize(
    "reads, body",
    [
        pytest.param(reads, body, id=f"{name}-{n}")
        for name, (message, body) in REUSABLE.items()
        for n, reads in enumerate(splits(message))
    ],
)
def test_keep_alive_response_in_any_reads(reads: list[bytes], body: bytes) -> None:
    client, transport = connect()
    exchange = Exchange(client)
    feed(client, *reads)
    assert exchange.response is not None and exchange.response.code == 200 and exchange.response.phrase == b"OK"
    assert exchange.sink.data == body
    assert exchange.sink.events == ["started", "done"]
    assert client.reusable and not transport.disconnecting


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        OK_KEEP_ALIVE + RETIRE_NOTICE,
        CHUNKED + RETIRE_NOTICE,
    ],
    ids=["no-connection-header", "close", "keep-alive-and-close", "http-1.0", "retire-after-cl", "retire-after-chunked"],
)
def test_not_reusable(response: bytes) -> None:
    client, transport = connect()
    exchange = Exchange(client)
    feed(client, response)
    assert exchange.sink.events == ["started", "done"]
    assert exchange.sink.data in (b"ok", b"hello", b"hello world")
    assert not client.reusable
    assert transport.disconnecting and not transport.disconnected  # closed, not aborted


def test_bytes_after_a_finished_response_retire_the_connection() -> None:
    client, transport = connect()
    Exchange(client)
    feed(client, OK_KEEP_ALIVE)
    assert client.reusable
    feed(client, RETIRE_NOTICE)
    assert not client.reusable and transport.disconnecting


@pytest.mark.parametrize("framing", [b"", b"Transfer-Encoding: gzip\r\nContent-Length: 3\r\n"], ids=["none", "gzip"])
def test_close_delimited_body_ends_at_a_clean_close(framing: bytes) -> None:
    client, _ = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n" + framing + b"\r\npart one, ", b"part two")
    assert exchange.response is not None and exchange.response.length is None
    assert exchange.sink.events == ["started"]
    client.connectionLost(Failure(ConnectionDone()))
    assert exchange.sink.data == b"part one, part two"
    assert exchange.sink.events == ["started", "done"]
    assert not client.reusable


def test_close_delimited_body_cut_by_a_reset_is_a_failure() -> None:
    # A worker that dies mid-body resets the connection: the consumer must
    # see a truncated response, not a clean end.
    client, _ = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\n\r\npart one")
    client.connectionLost(Failure(ConnectionLost()))
    assert exchange.sink.data == b"part one"
    assert exchange.sink.events == ["started", "failed"]


@pytest.mark.parametrize(
    "method, status, headers, length",
    [
        (b"HEAD", b"200 OK", b"Content-Length: 1234\r\n", 1234),
        (b"HEAD", b"200 OK", b"Transfer-Encoding: chunked\r\n", None),
        (b"GET", b"204 No Content", b"", None),
        (b"GET", b"304 Not Modified", b"Content-Length: 99\r\n", 99),
        (b"GET", b"200 OK", b"Content-Length: 0\r\n", 0),
    ],
)
def test_responses_without_a_body(method: bytes, status: bytes, headers: bytes, length: int | None) -> None:
    client, transport = connect()
    exchange = Exchange(client, method)
    feed(client, b"HTTP/1.1 " + status + b"\r\nConnection: keep-alive\r\n" + headers + b"\r\n")
    assert exchange.response is not None and exchange.response.length == length
    assert exchange.sink.data == b"" and exchange.sink.events == ["started", "done"]
    assert client.reusable and not transport.disconnecting


def test_deliver_called_later_gets_the_buffered_body_in_order() -> None:
    client, _ = connect()
    exchange = Exchange(client, deliver=False)
    feed(client, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 9\r\n\r\nab", b"cd", b"ef")
    assert exchange.response is not None
    sink = Sink()
    exchange.response.deliver(sink)
    assert sink.data == b"abcdef" and sink.events == ["started"]
    feed(client, b"ghi")
    assert sink.data == b"abcdefghi" and sink.events == ["started", "done"]
    assert client.reusable
    with pytest.raises(RuntimeError):
        exchange.response.deliver(Sink())


def test_response_completing_while_the_request_body_is_written() -> None:
    client, transport = connect()
    body = SlowBody()
    exchange = Exchange(client, b"POST", b"/", [], body)
    feed(client, b"HTTP/1.1 413 Too Large\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nnope")
    assert exchange.response is not None and exchange.response.code == 413
    assert exchange.sink.data == b"nope" and exchange.sink.events == ["started", "done"]
    assert body.stopped and transport.producer is None
    assert not client.reusable and transport.disconnecting
    written = transport.value()
    body.finish()  # a late write by a producer that ignores stopProducing
    assert transport.value() == written


# -- headers ------------------------------------------------------------------


def test_connection_control_headers_are_not_passed_on() -> None:
    client, _ = connect()
    exchange = Exchange(client)
    feed(
        client,
        b"HTTP/1.1 200 OK\r\nX-First: 1\r\nConnection: X-Hop\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nx-hop: dropped\r\n"
        b"Set-Cookie: b=2\r\nContent-Length: 2\r\nX-Last:   padded  \r\n\r\nok",
    )
    assert exchange.response is not None
    assert exchange.response.headers == [
        (b"X-First", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Last", b"padded"),
    ]
    assert exchange.response.length == 2 and exchange.sink.data == b"ok"


def test_transfer_encoding_drops_content_length() -> None:
    client, _ = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\nX: y\r\n\r\n0\r\n\r\n")
    assert exchange.response is not None and exchange.response.length is None
    assert exchange.response.headers == [(b"X", b"y")]
    assert exchange.sink.events == ["started", "done"]


# -- malformed responses ---------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : space before colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nbad header\r\n\r\n",
    ],
)
def test_malformed_head_fails_with_worker_failed_and_aborts(response: bytes) -> None:
    client, transport = connect()
    body = SlowBody()
    exchange = Exchange(client, b"POST", b"/", [], body)
    feed(client, response)
    assert exchange.failed_with() is WorkerFailed
    assert transport.disconnected and body.stopped and not client.reusable


@pytest.mark.parametrize("read_size", [10, 1000, 5000])
def test_head_larger_than_the_limit_fails(read_size: int) -> None:
    client, transport = connect()
    client.MAX_RESPONSE_HEAD = 4096
    exchange = Exchange(client)
    head = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"x" * 5000 + b"\r\n\r\n"
    reads = [head[i : i + read_size] for i in range(0, len(head), read_size)]
    for n, data in enumerate(reads):
        feed(client, data)
        if exchange.failure is not None:
            break
    assert exchange.failed_with() is WorkerFailed
    assert transport.disconnected
    assert n * read_size <= 4096, "the limit is applied while the head is still arriving"


def test_head_exactly_at_the_limit_is_accepted_and_one_more_byte_is_not() -> None:
    template = b"HTTP/1.1 204 No Content\r\nX: %s\r\n\r\n"
    exact = template % (b"y" * (100 - len(template % b"")))
    for message, accepted in ((exact, True), (exact.replace(b"X: ", b"X:  "), False)):
        client, _ = connect()
        client.MAX_RESPONSE_HEAD = 100
        exchange = Exchange(client)
        feed(client, *(message[i : i + 1] for i in range(len(message))))
        assert (exchange.response is not None) is accepted


def test_interim_responses_count_towards_the_head_limit() -> None:
    client, _ = connect()
    client.MAX_RESPONSE_HEAD = 1000
    exchange = Exchange(client)
    feed(client, *[b"HTTP/1.1 100 Continue\r\nX: " + b"z" * 40 + b"\r\n\r\n"] * 30)
    assert exchange.failed_with() is WorkerFailed


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello\r\n0\r\n\r\n", b"\r\n", b"5\r\nhelloXX\r\n0\r\n\r\n", b"5" * 5000],
    ids=["not-hex", "negative", "empty-size", "no-crlf-after-data", "size-line-too-long"],
)
def test_malformed_chunked_body_fails_the_sink(body: bytes) -> None:
    client, transport = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", body)
    assert exchange.response is not None
    assert exchange.sink.events == ["started", "failed"]
    assert exchange.sink.failure is not None and exchange.sink.failure.check(WorkerFailed)
    assert transport.disconnected and not client.reusable


# -- the connection is lost -----------------------------------------------------


@pytest.mark.parametrize(
    "writing, received, reason, expected",
    [
        (True, b"", ConnectionDone(), NotDelivered),
        (True, b"", ConnectionLost(), NotDelivered),
        (False, b"", ConnectionLost(), NotDelivered),
        (False, b"", ConnectionDone(), WorkerFailed),
        (False, b"HTTP/1.1 2", ConnectionLost(), WorkerFailed),
        (False, b"HTTP/1.1 200 OK\r\nX: y\r\n", ConnectionDone(), WorkerFailed),
        (False, b"HTTP/1.1 100 Continue\r\n\r\n", ConnectionLost(), WorkerFailed),
    ],
    ids=["writing-close", "writing-reset", "reset", "clean-close", "mid-status-line", "mid-headers", "after-100"],
)
def test_lost_before_a_response(writing: bool, received: bytes, reason: Exception, expected: type) -> None:
    client, _ = connect()
    body = SlowBody() if writing else WholeBody(b"data")
    exchange = Exchange(client, b"POST", b"/", [], body)
    if received:
        feed(client, received)
    client.connectionLost(Failure(reason))
    assert exchange.failed_with() is expected
    assert body.stopped is writing


def test_lost_after_the_request_with_a_tls_error_is_not_requeued() -> None:
    # Not a reset: the worker may have read the request, so a 502, not a requeue.
    client, _ = connect()
    exchange = Exchange(client, b"POST", b"/", [], WholeBody(b"data"))
    client.connectionLost(Failure(SSL.Error([("SSL routines", "", "bad record mac")])))
    assert exchange.failed_with() is WorkerFailed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_lost_mid_body_fails_the_sink(head: bytes) -> None:
    client, _ = connect()
    exchange = Exchange(client)
    feed(client, head + b"hel")
    exchange.sink.producer.pauseProducing()
    client.connectionLost(Failure(ConnectionDone()))
    assert exchange.sink.data == b"hel"
    assert exchange.sink.events == ["started", "failed"]
    assert exchange.sink.failure is not None and exchange.sink.failure.check(WorkerFailed)
    assert not client.reusable


@pytest.mark.parametrize(
    "message, data, outcome",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart", b"part", "failed"),
        (b"HTTP/1.1 200 OK\r\n\r\npart", b"part", "done"),
        (OK_KEEP_ALIVE, b"hello", "done"),
        (CHUNKED[:-3], b"hello world", "failed"),
    ],
    ids=["content-length", "close-delimited", "complete", "chunked"],
)
def test_lost_before_deliver_is_reported_by_deliver(message: bytes, data: bytes, outcome: str) -> None:
    client, _ = connect()
    exchange = Exchange(client, deliver=False)
    feed(client, message)
    client.connectionLost(Failure(ConnectionDone()))
    assert exchange.response is not None
    sink = Sink()
    exchange.response.deliver(sink)
    assert (sink.data, sink.events) == (data, ["started", outcome])
    assert not client.reusable


# -- backpressure ------------------------------------------------------------------


def test_body_producer_pauses_and_resumes_the_transport_and_is_detached() -> None:
    client, transport = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 6\r\n\r\nab")
    producer = exchange.sink.producer
    producer.pauseProducing()
    assert transport.producerState == "paused"
    producer.resumeProducing()
    assert transport.producerState == "producing"
    producer.pauseProducing()
    feed(client, b"cdef")  # data already in flight while paused
    assert exchange.sink.events == ["started", "done"]
    assert transport.producerState == "producing", "a paused transport is resumed when the body ends"
    producer.pauseProducing()  # a late pause from the consumer side
    assert transport.producerState == "producing", "the producer is detached after the body"
    producer.stopProducing()
    assert not transport.disconnected and client.reusable


def test_body_producer_stop_aborts_the_connection() -> None:
    client, transport = connect()
    exchange = Exchange(client)
    feed(client, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    exchange.sink.producer.stopProducing()
    assert transport.disconnected


# -- reentrancy: the next request sent from body_done ---------------------------------


@pytest.mark.parametrize(
    "method, reads",
    [
        (b"GET", [OK_KEEP_ALIVE]),
        (b"GET", [OK_KEEP_ALIVE[:-5], OK_KEEP_ALIVE[-5:]]),
        (b"GET", [OK_KEEP_ALIVE[:-2], OK_KEEP_ALIVE[-2:]]),
        (b"GET", [CHUNKED]),
        (b"GET", [CHUNKED[:-4], CHUNKED[-4:]]),
        (b"HEAD", [b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 99\r\n\r\n"]),
        (b"GET", [b"HTTP/1.1 100 Continue\r\n\r\n" + OK_KEEP_ALIVE]),
        (b"DELIVER-LATER", [OK_KEEP_ALIVE]),
    ],
    ids=["cl-one-read", "cl-body-later", "cl-body-split", "chunked-one-read", "chunked-split", "head", "after-100", "late"],
)
def test_next_request_sent_from_body_done(method: bytes, reads: list[bytes]) -> None:
    """Like ProxyJob.body_done -> job_finished -> dispatch of the next job."""
    client, transport = connect()
    nexts: list[Exchange] = []

    def send_next() -> None:
        assert client.reusable
        nexts.append(Exchange(client, b"GET", b"/second"))

    late = method == b"DELIVER-LATER"
    first = Exchange(client, b"GET" if late else method, b"/first", deliver=not late, sink=Sink(on_done=send_next))
    feed(client, *reads)
    if late:
        assert first.response is not None and not nexts
        first.response.deliver(first.sink)
    assert first.sink.events == ["started", "done"] and len(nexts) == 1
    assert transport.value().endswith(b" /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n")
    second = nexts[0]
    assert second.response is None, "the first response's bytes were taken for the second's"
    feed(client, b"HTTP/1.1 201 Created\r\nConnection: keep-alive\r\nContent-Length: 6\r\nX-Second: 1\r\n\r\nsecond")
    assert second.response is not None and second.response.code == 201
    assert second.response.headers == [(b"X-Second", b"1")]
    assert second.sink.data == b"second" and second.sink.events == ["started", "done"]
    assert client.reusable and not transport.disconnecting
