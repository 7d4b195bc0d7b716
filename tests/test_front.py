"""
Unit tests of :mod:`pothead.hub.front`, the hub's HTTP/1.1 server for consumers.

No reactor and no sockets: each connection is a :class:`ConsumerProtocol` on a
``StringTransport`` (``disconnecting`` once closed, ``disconnected`` too once
aborted; ``connectionLost`` is called by hand), built by a ``ConsumerSite`` on
a real :class:`~pothead.hub.dispatch.Hub` with a ``Clock``.  The site's
``handle`` only records each :class:`ConsumerRequest`, so no ``ProxyJob``
runs; the tests answer requests through the response API themselves, as
``ProxyJob`` would, and read the bytes the transport got.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Callable

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pothead.config import HubConfig
from pothead.hub.dispatch import Hub
from pothead.hub.front import MAX_HEADERS, MEMORY_BODY, ConsumerRequest, ConsumerSite

pytestmark = pytest.mark.no_reactor

GET = b"GET / HTTP/1.1\r\n\r\n"
DATE = re.compile(rb"\A[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT\Z")


# -- doubles ------------------------------------------------------------------


class Front:
    """A consumer port on a real Hub and a Clock; ``requests`` is what it handed over."""

    def __init__(self, handle: Callable[[ConsumerRequest], None] | None = None, **config: Any) -> None:
        self.clock = Clock()
        self.hub = Hub(HubConfig(**config), self.clock)
        self.requests: list[ConsumerRequest] = []
        self.site = ConsumerSite(self.hub, handle=handle or self.requests.append)

    def connect(self) -> Conn:
        return Conn(self.site)


class Conn:
    """One consumer connection: feed it bytes, take what it wrote."""

    def __init__(self, site: ConsumerSite) -> None:
        peer = IPv4Address("TCP", "192.0.2.7", 5555)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol: Any = site.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)

    def send(self, *reads: bytes) -> Conn:
        for data in reads:
            self.protocol.dataReceived(data)
        return self

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


def receive(*reads: bytes, **config: Any) -> tuple[Front, Conn]:
    front = Front(**config)
    return front, front.connect().send(*reads)


def split_response(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(status line, headers, rest) of one response."""
    head, separator, rest = data.partition(b"\r\n\r\n")
    assert separator, f"no complete head in {data!r}"
    status, *lines = head.split(b"\r\n")
    return status, [tuple(line.split(b": ", 1)) for line in lines], rest  # type: ignore[misc]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def assert_refused(conn: Conn, front: Front, code: int) -> None:
    data = conn.transport.value()
    status, headers, body = split_response(data)
    assert status.startswith(b"HTTP/1.1 %d " % code), data
    assert (b"Connection", b"close") in headers
    assert int(dict(headers)[b"Content-Length"]) == len(body)
    assert conn.closing
    assert front.requests == []
    assert front.hub.totals["rejected"] == 1


# -- parsing ------------------------------------------------------------------

HEAD = (
    b"PATCH /path/x?q=1&r=%20 HTTP/1.1\r\nHost: example.org\r\nX-Rep: one\r\n"
    b"x-rep:  two \r\nEmpty:\r\nOBS: caf\xc3\xa9\t\r\n\r\n"
)
HEAD_PARSED = (
    b"PATCH",
    b"/path/x?q=1&r=%20",
    b"HTTP/1.1",
    [(b"Host", b"example.org"), (b"X-Rep", b"one"), (b"x-rep", b"two"), (b"Empty", b""), (b"OBS", b"caf\xc3\xa9")],
)


def parsed(request: ConsumerRequest) -> tuple[Any, ...]:
    return request.method, request.uri, request.clientproto, request.headers


def test_head_is_parsed_as_received() -> None:
    front, conn = receive(HEAD)
    [request] = front.requests
    assert parsed(request) == HEAD_PARSED
    assert request.content is None
    assert request.header(b"x-rep") == b"one" and request.header_count(b"x-rep") == 2
    assert request.client_host() == "192.0.2.7"
    assert conn.transport.value() == b"" and not conn.closing


def test_head_split_at_every_byte_arrives_intact() -> None:
    for cut in range(1, len(HEAD)):
        front, _ = receive(HEAD[:cut], HEAD[cut:])
        assert [parsed(r) for r in front.requests] == [HEAD_PARSED], cut
    front, _ = receive(*(HEAD[i : i + 1] for i in range(len(HEAD))))
    assert [parsed(r) for r in front.requests] == [HEAD_PARSED]


def test_one_leading_empty_line_is_ignored() -> None:
    front, conn = receive(b"\r\nGET /a HTTP/1.1\r\n\r\n")
    assert [r.uri for r in front.requests] == [b"/a"] and conn.transport.value() == b""


def test_leading_empty_line_split_across_reads_is_ignored() -> None:
    front, conn = receive(b"\r", b"\nGET /a HTTP/1.1\r\n\r\n")
    assert [r.uri for r in front.requests] == [b"/a"] and conn.transport.value() == b""


CL_BODY = b"hello\r\n\r\nworld!"
CL_REQUEST = b"POST /up HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(CL_BODY), CL_BODY)
CHUNKED_REQUEST = (
    b"POST /up HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\na ; x=\"y;z\"\r\n\r\n\r\nworld!\r\n0\r\nX-Trailer: t\r\nY: u\r\n\r\n"
)


@pytest.mark.parametrize("raw", [CL_REQUEST, CHUNKED_REQUEST], ids=["content-length", "chunked"])
def test_body_split_at_every_byte_is_exact(raw: bytes) -> None:
    for cut in range(1, len(raw)):
        front, conn = receive(raw[:cut], raw[cut:])
        [request] = front.requests
        assert request.content is not None and request.content.tell() == 0, cut
        assert request.content.read() == CL_BODY, cut
        assert conn.transport.value() == b"", cut
    front, _ = receive(*(raw[i : i + 1] for i in range(len(raw))))
    assert front.requests[0].content.read() == CL_BODY  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [CL_REQUEST, CHUNKED_REQUEST], ids=["content-length", "chunked"])
def test_bytes_after_a_body_are_the_next_request(raw: bytes) -> None:
    front, conn = receive(raw + b"GET /next HTTP/1.1\r\n\r\n")
    front.requests[0].finish()
    assert [r.uri for r in front.requests] == [b"/up", b"/next"]
    assert front.requests[1].content is None


@pytest.mark.parametrize("size", [MEMORY_BODY, MEMORY_BODY + 1])
def test_small_bodies_are_spooled_in_memory_larger_ones_to_a_file(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    front, _ = receive(b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size, body[:1000], body[1000:])
    content = front.requests[0].content
    assert content is not None
    assert isinstance(content, BytesIO) == (size <= MEMORY_BODY)
    if size > MEMORY_BODY:
        assert content.fileno() >= 0
    assert content.read() == body


@pytest.mark.parametrize("size", [MEMORY_BODY, MEMORY_BODY + 1])
def test_chunked_bodies_spill_to_a_file_past_the_memory_limit(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 30000]), body[i : i + 30000]) for i in range(0, size, 30000))
    front, _ = receive(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", chunks, b"0\r\n\r\n")
    content = front.requests[0].content
    assert content is not None
    assert isinstance(content, BytesIO) == (size <= MEMORY_BODY)
    assert content.read() == body


# -- refusals -----------------------------------------------------------------

LIMIT = 400  # max_header_bytes of the refusal tests
REFUSALS = {
    "bare LF in request line": (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
    "bare LF ending a header": (b"GET / HTTP/1.1\r\nHost: x\n\r\n\r\n", 400),
    "bare LF only line ends": (b"GET / HTTP/1.1\n\n", 400),
    "bare LF in a partial head": (b"GET / HTTP/1.1\r\nHost: x\nAcc", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", 400),
    "obs-fold with tab": (b"GET / HTTP/1.1\r\nX-A: a\r\n\tb\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "space in name": (b"GET / HTTP/1.1\r\nX A: b\r\n\r\n", 400),
    "no colon": (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", 400),
    "empty name": (b"GET / HTTP/1.1\r\n: x\r\n\r\n", 400),
    "NUL in value": (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    "bare CR in value": (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    "DEL in value": (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400),
    "CL and TE": (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "TE and CL": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    "two equal CLs": (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "CL list": (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "CL sign": (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
    "CL negative": (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    "CL hex": (b"POST / HTTP/1.1\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    "CL empty": (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
    "CL unicode digit": (b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\nabc", 400),
    "TE gzip": (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "TE gzip, chunked": (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "TE empty": (b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", 501),
    "TE twice": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "TE chunked, chunked": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    "TE on HTTP/1.0": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "CL over max_body": (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n", 413),
    "chunk over max_body": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n", 413),
    "chunks over max_body": (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1f4\r\n" + b"a" * 500 + b"\r\n1f5\r\n",
        413,
    ),
    "chunk size not hex": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", 400),
    "chunk size 0x": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", 400),
    "chunk size empty": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", 400),
    "chunk size signed": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n", 400),
    "chunk size bare LF": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n", 400),
    "chunk without CRLF": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n", 400),
    "request line too long": (b"GET /" + b"a" * LIMIT + b" HTTP/1.1\r\n\r\n", 414),
    "request line too long, partial": (b"GET /" + b"a" * LIMIT, 414),
    "head too long": (b"GET / HTTP/1.1\r\nX: " + b"a" * LIMIT + b"\r\n\r\n", 431),
    "head too long, partial": (b"GET / HTTP/1.1\r\nX: " + b"a" * LIMIT, 431),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\n\r\n", 505),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\n\r\n", 505),
    "lower-case version": (b"GET / http/1.1\r\n\r\n", 400),
    "no version": (b"GET /\r\n\r\n", 400),
    "garbage": (b"hello\r\n\r\n", 400),
    "two spaces": (b"GET  / HTTP/1.1\r\n\r\n", 400),
    "method not a token": (b"G(T / HTTP/1.1\r\n\r\n", 400),
    "control char in target": (b"GET /a\x01b HTTP/1.1\r\n\r\n", 400),
    "two leading empty lines": (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize("raw, code", list(REFUSALS.values()), ids=list(REFUSALS))
def test_refused_with_a_status_and_a_close(raw: bytes, code: int) -> None:
    front, conn = receive(raw, max_body=1000, max_header_bytes=LIMIT)
    assert_refused(conn, front, code)
    conn.send(b"GET /after HTTP/1.1\r\n\r\n")
    assert front.requests == []


def test_limits_are_inclusive() -> None:
    line = b"GET /" + b"a" * (LIMIT - 14) + b" HTTP/1.1"
    assert len(line) == LIMIT
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * (LIMIT - 19)
    assert len(head) == LIMIT
    many = b"GET / HTTP/1.1\r\n" + b"a:\r\n" * MAX_HEADERS
    front = Front(max_header_bytes=LIMIT, max_body=5)
    for raw in (line + b"\r\n\r\n", head + b"\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"):
        front.connect().send(raw)
    assert len(front.requests) == 3
    front = Front(max_header_bytes=len(many))
    front.connect().send(many + b"\r\n")
    assert len(front.requests) == 1 and len(front.requests[0].headers) == MAX_HEADERS


def test_more_than_max_headers_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"a:\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    front, conn = receive(raw, max_header_bytes=len(raw))
    assert_refused(conn, front, 431)


def test_request_line_too_long_is_414_however_it_is_split() -> None:
    line = b"GET /" + b"a" * (LIMIT - 13) + b" HTTP/1.1"  # one byte too long
    front, conn = receive(line + b"\r\nHost: x", b"\r\n\r\n", max_header_bytes=LIMIT)
    assert_refused(conn, front, 414)


@pytest.mark.parametrize(
    "trailer",
    [b"5;ext\nx\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nX: a\nY: b\r\n\r\n"],
    ids=["chunk extension", "trailer"],
)
def test_bare_lf_in_chunked_framing_is_refused(trailer: bytes) -> None:
    front, conn = receive(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + trailer)
    assert_refused(conn, front, 400)


# -- Expect: 100-continue -----------------------------------------------------


def test_100_continue_is_sent_before_the_body_is_read() -> None:
    front, conn = receive(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n")
    assert conn.take() == b"HTTP/1.1 100 Continue\r\n\r\n" and front.requests == []
    conn.send(b"hello")
    assert front.requests[0].content.read() == b"hello"  # type: ignore[union-attr]
    assert conn.take() == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["HTTP/1.0", "no body", "no expectation"],
)
def test_no_100_continue(raw: bytes) -> None:
    _, conn = receive(raw)
    assert conn.transport.value() == b""


# -- responses ----------------------------------------------------------------


def answer(request_line: bytes = GET, **config: Any) -> tuple[Front, Conn, ConsumerRequest]:
    front, conn = receive(request_line, **config)
    return front, conn, front.requests[-1]


def test_response_head_in_order_with_a_date_and_no_server() -> None:
    _, conn, request = answer()
    request.set_response_code(201)
    request.add_response_header(b"X-One", b"1")
    request.set_response_header(b"Content-Length", b"5")
    request.add_response_header(b"x-two", b"2")
    request.add_response_header(b"X-One", b"3")
    request.write(b"hel")
    request.write(b"lo")
    request.finish()
    status, headers, body = split_response(conn.take())
    assert status == b"HTTP/1.1 201 Created"
    assert headers[:4] == [(b"X-One", b"1"), (b"Content-Length", b"5"), (b"x-two", b"2"), (b"X-One", b"3")]
    assert names(headers[4:]) == [b"date"] and DATE.match(headers[4][1])
    assert b"server" not in names(headers) and body == b"hello"
    assert not conn.closing


def test_a_date_given_is_kept_and_a_phrase_given_is_used() -> None:
    _, conn, request = answer()
    request.set_response_code(299, b"Fine Indeed")
    request.set_response_header(b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT")
    request.set_response_header(b"Content-Length", b"0")
    request.finish()
    status, headers, body = split_response(conn.take())
    assert status == b"HTTP/1.1 299 Fine Indeed"
    assert headers == [(b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT"), (b"Content-Length", b"0")]
    assert body == b""


def test_response_without_length_is_chunked_on_http11() -> None:
    _, conn, request = answer()
    request.write(b"hello")
    request.write(b"")
    request.write(b" world!")
    assert not conn.transport.value().endswith(b"0\r\n\r\n")
    request.finish()
    request.write(b"late")
    request.finish()
    status, headers, body = split_response(conn.take())
    assert status == b"HTTP/1.1 200 OK" and (b"Transfer-Encoding", b"chunked") in headers
    assert body == b"5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    assert b"connection" not in names(headers) and not conn.closing


def test_finish_without_write_sends_the_head() -> None:
    _, conn, request = answer()
    request.finish()
    _, headers, body = split_response(conn.take())
    assert (b"Transfer-Encoding", b"chunked") in headers and body == b"0\r\n\r\n"
    _, conn, request = answer()
    request.set_response_code(404)
    request.set_response_header(b"Content-Length", b"0")
    request.finish()
    status, headers, body = split_response(conn.take())
    assert status == b"HTTP/1.1 404 Not Found" and body == b"" and b"transfer-encoding" not in names(headers)


def test_http10_response_is_close_delimited() -> None:
    _, conn, request = answer(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    request.write(b"hello")
    assert not conn.closing
    request.write(b" world")
    request.finish()
    status, headers, body = split_response(conn.take())
    assert status == b"HTTP/1.0 200 OK"
    assert (b"Connection", b"close") in headers and b"transfer-encoding" not in names(headers)
    assert body == b"hello world" and conn.closing


@pytest.mark.parametrize("length", [None, b"5"])
@pytest.mark.parametrize("method, code", [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_responses_without_a_body(method: bytes, code: int, length: bytes | None) -> None:
    front, conn, request = answer(method + b" / HTTP/1.1\r\n\r\n")
    request.set_response_code(code)
    if length is not None:
        request.set_response_header(b"Content-Length", length)
    request.write(b"hello")
    request.write(b"world")
    request.finish()
    data = conn.take()
    _, headers, body = split_response(data)
    assert body == b"" and data.endswith(b"\r\n\r\n")
    assert b"transfer-encoding" not in names(headers) and not conn.closing
    conn.send(GET)
    assert len(front.requests) == 2


def test_abort_cuts_the_consumer_off() -> None:
    _, conn, request = answer()
    request.write(b"partial")
    request.abort()
    assert conn.transport.disconnected


# -- persistence --------------------------------------------------------------


def test_http11_connection_is_kept_for_the_next_request() -> None:
    front, conn, request = answer()
    request.set_response_header(b"Content-Length", b"2")
    request.write(b"ok")
    request.finish()
    assert not conn.closing
    conn.send(b"GET /2 HTTP/1.1\r\n\r\n")
    assert [r.uri for r in front.requests] == [b"/", b"/2"]


@pytest.mark.parametrize(
    "raw, close_after",
    [
        (b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (GET, True),
    ],
    ids=["close token", "close", "HTTP/1.0", "close_after"],
)
def test_connection_closed_after_the_response(raw: bytes, close_after: bool) -> None:
    front, conn, request = answer(raw)
    if close_after:
        request.close_after()
    request.set_response_header(b"Content-Length", b"2")
    request.write(b"ok")
    assert not conn.closing
    request.finish()
    _, headers, body = split_response(conn.take())
    assert (b"Connection", b"close") in headers and body == b"ok" and conn.closing
    conn.send(GET)
    assert len(front.requests) == 1


# -- pipelining ---------------------------------------------------------------


def test_pipelined_requests_are_handled_one_at_a_time_in_order() -> None:
    front, conn = receive(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HT")
    assert [r.uri for r in front.requests] == [b"/1"]
    assert conn.transport.producerState == "paused"  # the rest waits, unread
    conn.send(b"TP/1.1\r\n\r\n")
    assert conn.transport.producerState == "paused" and [r.uri for r in front.requests] == [b"/1"]
    for index, uri in enumerate([b"/1", b"/2", b"/3"]):
        request = front.requests[index]
        assert request.uri == uri and len(front.requests) == index + 1
        request.set_response_header(b"Content-Length", b"2")
        request.write(b"%d!" % (index + 1))
        request.finish()
        # Paused while a complete request still waits behind the one in progress.
        assert conn.transport.producerState == ("paused" if index == 0 else "producing")
    data = conn.take()
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert [split_response(part)[2] for part in data.split(b"HTTP/1.1 ")[1:]] == [b"1!", b"2!", b"3!"]


def test_pipelined_requests_answered_synchronously_come_out_in_order() -> None:
    seen: list[bytes] = []

    def handle(request: ConsumerRequest) -> None:
        seen.append(request.uri)
        request.set_response_header(b"Content-Length", b"%d" % len(request.uri))
        request.write(request.uri)
        request.finish()

    front = Front(handle=handle)
    conn = front.connect()
    conn.send(b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /c HTTP/1.1\r\n\r\n")
    assert seen == [b"/a", b"/b", b"/c"]
    bodies = [split_response(part)[2] for part in conn.take().split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"/a", b"/b", b"/c"] and not conn.closing


# -- consumer lost ------------------------------------------------------------


def test_lost_before_the_response_is_finished_calls_on_lost_once() -> None:
    front, conn, request = answer()
    calls: list[Failure] = []
    request.on_lost = calls.append
    request.write(b"partial")
    assert front.site.channels == {conn.protocol}
    conn.take()
    conn.lose(ConnectionLost())
    assert len(calls) == 1 and calls[0].check(ConnectionLost)
    assert front.site.channels == set()
    request.write(b"more")
    request.finish()
    conn.lose()
    assert len(calls) == 1 and conn.transport.value() == b""


def test_lost_after_the_response_does_not_call_on_lost() -> None:
    front, conn, request = answer()
    calls: list[Failure] = []
    request.on_lost = calls.append
    request.finish()
    conn.lose()
    assert calls == [] and front.site.channels == set()


def test_site_tracks_open_connections() -> None:
    front = Front()
    first, second = front.connect(), front.connect()
    assert front.site.channels == {first.protocol, second.protocol}
    first.lose()
    assert front.site.channels == {second.protocol}


# -- timeouts -----------------------------------------------------------------


def test_partial_head_older_than_header_timeout_is_408() -> None:
    front = Front(header_timeout=10.0, consumer_idle_timeout=60.0)
    conn = front.connect()
    front.clock.advance(5)
    conn.send(b"GET / HT")
    front.clock.advance(9.5)
    assert conn.transport.value() == b"" and not conn.closing
    front.clock.advance(1)
    assert_refused(conn, front, 408)


def test_idle_connection_older_than_idle_timeout_is_closed_without_408() -> None:
    front = Front(header_timeout=10.0, consumer_idle_timeout=60.0)
    conn = front.connect()
    front.clock.advance(59.5)
    assert not conn.closing
    front.clock.advance(1)
    assert conn.closing and conn.transport.value() == b""


def test_idle_time_counts_from_the_last_response() -> None:
    front = Front(header_timeout=10.0, consumer_idle_timeout=60.0)
    conn = front.connect()
    front.clock.advance(30)
    conn.send(GET)
    front.clock.advance(30)
    front.requests[0].finish()
    front.clock.advance(59.5)
    assert not conn.closing
    front.clock.advance(1)
    assert conn.closing


def test_stalled_upload_is_closed_after_idle_timeout() -> None:
    front = Front(header_timeout=10.0, consumer_idle_timeout=60.0)
    conn = front.connect().send(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
    for _ in range(3):
        front.clock.advance(50)
        conn.send(b"c")
    front.clock.advance(59.5)
    assert not conn.closing
    front.clock.advance(1)
    assert conn.closing and conn.transport.value() == b"" and front.requests == []


def test_request_waiting_for_its_response_is_never_timed_out() -> None:
    front = Front(header_timeout=1.0, consumer_idle_timeout=2.0)
    conn = front.connect().send(GET)
    front.clock.advance(1000)
    assert not conn.closing and conn.transport.value() == b""
    front.requests[0].finish()
    assert not conn.closing


def test_one_timer_that_stops_when_no_connection_remains() -> None:
    front = Front(header_timeout=10.0, consumer_idle_timeout=60.0)
    assert front.clock.getDelayedCalls() == []
    first, second = front.connect(), front.connect().send(b"GET")
    assert len(front.clock.getDelayedCalls()) == 1
    front.clock.advance(3)
    assert len(front.clock.getDelayedCalls()) == 1
    first.lose()
    second.lose()
    front.clock.advance(1)
    assert front.clock.getDelayedCalls() == []
    front.connect()
    assert len(front.clock.getDelayedCalls()) == 1


def test_no_timer_without_timeouts() -> None:
    front = Front(header_timeout=None, consumer_idle_timeout=None)
    conn = front.connect().send(b"GET / HT")
    assert front.clock.getDelayedCalls() == []
    assert not conn.closing


# -- max_connections and drain ------------------------------------------------


def test_connection_over_max_connections_gets_503_and_is_closed() -> None:
    front = Front(max_connections=2)
    first, _ = front.connect(), front.connect()
    extra = front.connect()
    status, headers, body = split_response(extra.transport.value())
    assert status == b"HTTP/1.1 503 Service Unavailable" and (b"Connection", b"close") in headers
    assert int(dict(headers)[b"Content-Length"]) == len(body) and extra.closing
    assert len(front.site.channels) == 2 and front.site.connections_refused == 1
    extra.send(GET)
    assert front.requests == []
    first.lose()
    assert front.connect().transport.value() == b""


def test_lose_connection_closes_an_idle_connection_at_once() -> None:
    _, conn = receive()
    conn.protocol.loseConnection()
    assert conn.closing


def test_lose_connection_closes_a_busy_connection_after_its_response() -> None:
    _, conn, request = answer()
    conn.protocol.loseConnection()
    assert not conn.closing
    request.set_response_header(b"Content-Length", b"2")
    request.write(b"ok")
    assert not conn.closing
    request.finish()
    _, headers, body = split_response(conn.take())
    assert (b"Connection", b"close") in headers and body == b"ok" and conn.closing
