"""
HTTP semantics of the hub, pinned end to end: a real hub and a real worker in
this process, on 127.0.0.1 with OS-chosen ports.

Request side: what the WSGI app sees (method, target, headers, body) for what
the consumer sent.  Response side: what the consumer gets (status line,
headers, body framing, streaming, backpressure) for what the app produced.
Keep-alive: how worker connections are reused.

Consumers are plain sockets (tests/_semantics_http.py) run in threads, so the
tests see the exact bytes on the wire; treq is used where streaming matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Callable, Iterable

import psutil
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads

import _semantics_http as h
from pothead.config import HubConfig, WorkerConfig
from pothead.testing import RunningPair, running_pair, sleep, start_hub, wait_until

pytestmark = pytest.mark.timeout(60)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client in a thread (never on the reactor thread)."""
    return threads.deferToThread(fn, *args, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Echo:
    """A WSGI app answering with what it saw: its environ (str values) and a hash of the body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self._lock:
            self.calls += 1
        body = environ["wsgi.input"].read()
        seen = {
            "environ": {k: v for k, v in environ.items() if isinstance(v, str)},
            "body_length": len(body),
            "body_sha256": sha256(body),
        }
        out = json.dumps(seen).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
        return [out]


def echoed(response: h.Response) -> dict[str, Any]:
    assert response.status == 200, (response.status, response.reason, response.body[:500])
    return json.loads(response.body)


def environ_of(response: h.Response) -> dict[str, str]:
    return echoed(response)["environ"]


# --------------------------------------------------------------------------
# Request side
# --------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "X-CUSTOM-METHOD"]

# Odd but legal request targets (RFC 3986 pchar / query characters).
ODD_PATH = "/odd/-._~!$&'()*+,;=:@/%7E/%2525/a%20b/%E2%82%AC/"
#: PATH_INFO is percent-decoded once per segment (PEP 3333, twisted.web.wsgi), as a latin-1 str.
ODD_PATH_INFO = "/odd/-._~!$&'()*+,;=:@/~/%25/a b/\u00e2\u0082\u00ac/"
ODD_QUERY = "q=a+b&enc=%26%3D%2B%20&slash=/?x&euro=%E2%82%AC&pct=%25&&flag&sub='()*!$,;:@"

TARGETS = [
    # (request target, PATH_INFO, QUERY_STRING)
    ("/", "/", ""),
    ("/plain/path?x=1", "/plain/path", "x=1"),
    ("/a//b/", "/a//b/", ""),
    ("/empty-query?", "/empty-query", ""),
    (f"{ODD_PATH}?{ODD_QUERY}", ODD_PATH_INFO, ODD_QUERY),
]


@pytest_twisted.ensureDeferred
async def test_method_reaches_app_unchanged() -> None:
    async with running_pair(Echo()) as pair:
        port = pair.hub.consumer_port
        for method in METHODS:
            environ = environ_of(await call(h.request, port, method, "/method"))
            assert environ["REQUEST_METHOD"] == method


@pytest_twisted.ensureDeferred
async def test_path_and_raw_query_reach_app_unchanged() -> None:
    async with running_pair(Echo()) as pair:
        port = pair.hub.consumer_port
        for target, path_info, query in TARGETS:
            environ = environ_of(await call(h.request, port, "GET", target))
            assert (environ["SCRIPT_NAME"], environ["PATH_INFO"], environ["QUERY_STRING"]) == (
                "",
                path_info,
                query,
            ), target


def fake_worker(port: int, reply: bytes) -> bytes:
    """A bare-socket worker: connect to the hub, read one request, send ``reply``."""
    with h.connect(port) as sock:
        reader = h.Reader(sock)
        head = reader.read_until(b"\r\n\r\n")
        _, _, _, headers = h.parse_head(b"HTTP/1.1 000 x\r\n" + head.split(b"\r\n", 1)[1])
        length = [int(v) for n, v in headers if n.lower() == b"content-length"]
        body = reader.read_exact(length[0]) if length else b""
        sock.sendall(reply)
        return head + body


@pytest_twisted.ensureDeferred
async def test_request_target_and_headers_on_the_worker_wire_are_byte_exact() -> None:
    """Percent-encoding, odd characters and repeated headers reach the worker as sent.

    (twisted.web.wsgi has no REQUEST_URI, and PATH_INFO is decoded, so the raw
    request line is checked on the wire with a bare-socket worker.)
    """
    hub = await start_hub(reactor)
    try:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfine"
        worker = call(fake_worker, hub.worker_port, reply)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        target = f"{ODD_PATH}?{ODD_QUERY}"
        response = await call(
            h.request,
            hub.consumer_port,
            "PATCH",
            target,
            [("X-Multi", "one"), ("X-Spaces", "a   b"), ("X-Multi", "two")],
            b"payload",
        )
        wire = await worker
        assert (response.status, response.body) == (200, b"fine")
        request_line, _, rest = wire.partition(b"\r\n")
        assert request_line == f"PATCH {target} HTTP/1.1".encode()
        head, _, body = rest.partition(b"\r\n\r\n")
        _, _, _, headers = h.parse_head(b"HTTP/1.1 000 x\r\n" + head)
        by_name = [(n.lower(), v) for n, v in headers]
        assert [v for n, v in by_name if n == b"x-multi"] == [b"one", b"two"]
        assert [v for n, v in by_name if n == b"x-spaces"] == [b"a   b"]
        assert [v for n, v in by_name if n == b"host"] == [b"pothead.test"]
        assert [v for n, v in by_name if n == b"content-length"] == [b"7"]
        assert body == b"payload"
    finally:
        await hub.service.stopService()


END_TO_END = [
    ("Accept", "text/html, application/xhtml+xml;q=0.9, */*;q=0.8", "HTTP_ACCEPT"),
    ("Accept-Language", "de-CH, en;q=0.5", "HTTP_ACCEPT_LANGUAGE"),
    ("User-Agent", "pothead-tests/1.0 (+http://example.test/x)", "HTTP_USER_AGENT"),
    ("Authorization", "Bearer abc.DEF-123_~+/=", "HTTP_AUTHORIZATION"),
    ("Cookie", 'a=1; b=two; c="three"', "HTTP_COOKIE"),
    ("Cache-Control", "no-cache", "HTTP_CACHE_CONTROL"),
    ("If-None-Match", '"v1", W/"v2"', "HTTP_IF_NONE_MATCH"),
    ("Via", "1.1 upstream-proxy", "HTTP_VIA"),
    ("X-Spaces", "a   b  c", "HTTP_X_SPACES"),
    ("X-Latin1", "caf\u00e9", "HTTP_X_LATIN1"),
    ("X-Empty", "", "HTTP_X_EMPTY"),
    ("Content-Type", "text/plain; charset=utf-8", "CONTENT_TYPE"),
]


@pytest_twisted.ensureDeferred
async def test_end_to_end_request_headers_reach_app_unchanged() -> None:
    headers: list[tuple[str, str | bytes]] = [(name, value.encode("latin-1")) for name, value, _ in END_TO_END]
    headers += [("X-Multi", "one"), ("X-Multi", "two")]
    async with running_pair(Echo()) as pair:
        environ = environ_of(await call(h.request, pair.hub.consumer_port, "POST", "/headers", headers, b"hello"))
    for name, value, key in END_TO_END:
        assert environ.get(key) == value, name
    # twisted.web.wsgi joins repeated headers with ","; order must be kept.
    assert environ["HTTP_X_MULTI"] == "one,two"
    assert environ["HTTP_HOST"] == "pothead.test"
    assert environ["CONTENT_LENGTH"] == "5"


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_request_headers_are_removed() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Connection", "x-OTHER-hop"),
        ("X-Secret-Hop", "must not pass"),
        ("X-Other-Hop", "must not pass"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "example/1.0"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Custom", "must not pass"),
        ("X-End-To-End", "kept"),
    ]
    async with running_pair(Echo()) as pair:
        request = h.build_request("GET", "/hop", headers, close=False)
        environ = environ_of(await call(h.exchange, pair.hub.consumer_port, request))
    assert environ["HTTP_X_END_TO_END"] == "kept"
    leaked = {
        key: value
        for key, value in environ.items()
        if key
        in (
            "HTTP_CONNECTION",
            "HTTP_KEEP_ALIVE",
            "HTTP_TE",
            "HTTP_TRAILER",
            "HTTP_UPGRADE",
            "HTTP_X_SECRET_HOP",
            "HTTP_X_OTHER_HOP",
        )
        or key.startswith("HTTP_PROXY_")
        or "must not pass" in value
    }
    assert leaked == {}


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_are_added() -> None:
    async with running_pair(Echo()) as pair:
        port = pair.hub.consumer_port

        first = environ_of(await call(h.exchange, port, h.build_request("GET", "/", host="example.test:8123")))
        assert first["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert first["HTTP_X_FORWARDED_PROTO"] == "http"
        assert first["HTTP_X_FORWARDED_HOST"] == "example.test:8123"
        assert first["HTTP_HOST"] == "example.test:8123"

        # An existing X-Forwarded-For is extended with the consumer's address.
        second = environ_of(await call(h.request, port, "GET", "/", [("X-Forwarded-For", "203.0.113.7")]))
        assert second["HTTP_X_FORWARDED_FOR"] == "203.0.113.7, 127.0.0.1"

        # Several X-Forwarded-For lines form one chain, in order.
        third = environ_of(
            await call(
                h.request,
                port,
                "GET",
                "/",
                [("X-Forwarded-For", "198.51.100.1, 203.0.113.7"), ("X-Forwarded-For", "192.0.2.9")],
            )
        )
        assert third["HTTP_X_FORWARDED_FOR"] == "198.51.100.1, 203.0.113.7, 192.0.2.9, 127.0.0.1"

        # Without --trust-forwarded, a consumer cannot choose Proto or Host for the app.
        spoofed = environ_of(
            await call(
                h.request, port, "GET", "/", [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.test")]
            )
        )
        assert spoofed["HTTP_X_FORWARDED_PROTO"] == "http"
        assert spoofed["HTTP_X_FORWARDED_HOST"] == "pothead.test"


@pytest_twisted.ensureDeferred
async def test_request_id_is_kept_or_generated_and_returned() -> None:
    async with running_pair(Echo()) as pair:
        port = pair.hub.consumer_port

        kept = await call(h.request, port, "GET", "/", [("X-Request-Id", "consumer-id-42")])
        environ = environ_of(kept)
        assert environ["REQUEST_ID"] == "consumer-id-42"
        assert environ["HTTP_X_REQUEST_ID"] == "consumer-id-42"
        assert kept.values(b"x-request-id") == [b"consumer-id-42"]

        ids = []
        for _ in range(2):
            generated = await call(h.request, port, "GET", "/")
            environ = environ_of(generated)
            [rid] = generated.values(b"x-request-id")
            assert len(rid) >= 16
            assert environ["REQUEST_ID"] == rid.decode()
            assert environ["HTTP_X_REQUEST_ID"] == rid.decode()
            ids.append(rid)
        assert ids[0] != ids[1]

        # An unusable id (spaces) is replaced, consistently for app and consumer.
        replaced = await call(h.request, port, "GET", "/", [("X-Request-Id", "not a usable id")])
        environ = environ_of(replaced)
        [rid] = replaced.values(b"x-request-id")
        assert rid != b"not a usable id"
        assert environ["REQUEST_ID"] == rid.decode() == environ["HTTP_X_REQUEST_ID"]


@pytest_twisted.ensureDeferred
async def test_consumer_pothead_headers_are_not_forwarded() -> None:
    app = Echo()
    headers = [
        ("Pothead-Requeue", "1"),
        ("Pothead-Reuse", "consumer-value"),
        ("POTHEAD-Anything", "consumer-value"),
        ("X-Control", "kept"),
    ]
    async with running_pair(app) as pair:
        environ = environ_of(await call(h.request, pair.hub.consumer_port, "GET", "/", headers))
    assert environ["HTTP_X_CONTROL"] == "kept"
    assert "HTTP_POTHEAD_REQUEUE" not in environ
    assert "HTTP_POTHEAD_ANYTHING" not in environ
    assert {k: v for k, v in environ.items() if "consumer-value" in v} == {}
    assert app.calls == 1


@pytest_twisted.ensureDeferred
async def test_http10_request_without_host_is_served() -> None:
    """HTTP/1.0 does not require Host (load balancer health checks often omit it)."""
    app = Echo()
    async with running_pair(app) as pair:
        port = pair.hub.consumer_port
        response = await call(h.exchange, port, b"GET /health?x=1 HTTP/1.0\r\n\r\n")
        assert response.status == 200, (response.status, response.body)
        environ = environ_of(response)
        assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/health", "x=1")
        assert pair.hub.service.hub.totals["worker_disconnected"] == 0


@pytest_twisted.ensureDeferred
async def test_http11_request_without_or_with_two_hosts_gets_400() -> None:
    """RFC 9112 3.2: 400 for an HTTP/1.1 request without Host or with several; the app never runs."""
    app = Echo()
    async with running_pair(app) as pair:
        port = pair.hub.consumer_port
        missing = await call(h.exchange, port, h.build_request("GET", "/no-host", host=None))
        duplicate = await call(h.exchange, port, h.build_request("GET", "/two-hosts", [("Host", "b.test")]))
        assert (missing.status, duplicate.status) == (400, 400)
        assert app.calls == 0
        # The hub is still serving, and no worker connection was sacrificed.
        assert echoed(await call(h.request, port, "GET", "/"))
        assert pair.hub.service.hub.totals["worker_disconnected"] == 0


@pytest_twisted.ensureDeferred
async def test_absolute_form_request_target_reaches_app_as_origin_form() -> None:
    """RFC 9112 3.2.2: a server must accept absolute-form; the host comes from the target."""
    async with running_pair(Echo()) as pair:
        request = h.build_request("GET", "http://example.test:8123/abs/p%20q?x=1&y=/z", host="ignored.test")
        environ = environ_of(await call(h.exchange, pair.hub.consumer_port, request))
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/abs/p q", "x=1&y=/z")
    assert environ["HTTP_HOST"] == "example.test:8123"


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running_pair(Echo(), threads=2) as pair:
        data = b"".join(
            h.build_request(method, path, [], body, close=(i == 2))
            for i, (method, path, body) in enumerate(
                [("GET", "/one", None), ("POST", "/two", b"second body"), ("GET", "/three", None)]
            )
        )

        def client(port: int) -> list[h.Response]:
            with h.connect(port) as sock:
                sock.sendall(data)
                reader = h.Reader(sock)
                return [h.read_response(reader) for _ in range(3)]

        responses = await call(client, pair.hub.consumer_port)
    seen = [echoed(r) for r in responses]
    assert [s["environ"]["PATH_INFO"] for s in seen] == ["/one", "/two", "/three"]
    assert seen[1]["body_sha256"] == sha256(b"second body")


async def _post_and_check(pair: RunningPair, body: bytes) -> dict[str, Any]:
    seen = echoed(await call(h.request, pair.hub.consumer_port, "POST", "/upload", [], body))
    assert (seen["body_length"], seen["body_sha256"]) == (len(body), sha256(body))
    return seen


@pytest_twisted.ensureDeferred
async def test_empty_post_body() -> None:
    async with running_pair(Echo()) as pair:
        seen = await _post_and_check(pair, b"")
    assert seen["environ"]["CONTENT_LENGTH"] in ("", "0")


@pytest_twisted.ensureDeferred
async def test_small_body_with_every_byte_value() -> None:
    body = bytes(range(256)) * 4 + b"\r\n\r\n0\r\n\r\n"
    async with running_pair(Echo()) as pair:
        seen = await _post_and_check(pair, body)
    assert seen["environ"]["CONTENT_LENGTH"] == str(len(body))


@pytest_twisted.ensureDeferred
async def test_five_megabyte_body() -> None:
    body = os.urandom(5 * 1024 * 1024 + 123)
    async with running_pair(Echo()) as pair:
        seen = await _post_and_check(pair, body)
    assert seen["environ"]["CONTENT_LENGTH"] == str(len(body))


@pytest_twisted.ensureDeferred
async def test_chunked_upload_arrives_intact() -> None:
    pieces = [b"a", os.urandom(1000), os.urandom(1024 * 1024), b"", os.urandom(300_000)]
    pieces = [p for p in pieces if p]
    body = b"".join(pieces)
    head = h.build_request("PUT", "/chunked", [("Transfer-Encoding", "chunked")])
    async with running_pair(Echo()) as pair:
        # Head and body in separate writes, the body's chunks split further.
        encoded = h.chunked(pieces, extension=b";ext=1")
        parts = [head, encoded[:7], encoded[7:500_000], encoded[500_000:]]
        seen = echoed(await call(h.exchange, pair.hub.consumer_port, parts))
    assert (seen["body_length"], seen["body_sha256"]) == (len(body), sha256(body))
    environ = seen["environ"]
    assert environ["CONTENT_LENGTH"] == str(len(body))
    assert "HTTP_TRANSFER_ENCODING" not in environ


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_is_answered_by_the_hub() -> None:
    body = b"continue-body"

    def client(port: int) -> tuple[bytes, h.Response]:
        head = h.build_request("POST", "/expect", [("Expect", "100-continue"), ("Content-Length", str(len(body)))])
        with h.connect(port) as sock:
            sock.sendall(head)
            reader = h.Reader(sock)
            interim = reader.read_until(b"\r\n\r\n")
            sock.sendall(body)
            return interim, h.read_response(reader)

    async with running_pair(Echo()) as pair:
        interim, response = await call(client, pair.hub.consumer_port)
    assert interim.startswith(b"HTTP/1.1 100 ")
    seen = echoed(response)
    assert (seen["body_length"], seen["body_sha256"]) == (len(body), sha256(body))
    assert "HTTP_EXPECT" not in seen["environ"]


@pytest_twisted.ensureDeferred
async def test_max_body_declared_content_length_gets_413() -> None:
    app = Echo()
    async with running_pair(app, hub_config=HubConfig(max_body=1000)) as pair:
        port = pair.hub.consumer_port
        # Only the head: the hub must refuse on the declared length alone.
        refused = await call(h.exchange, port, h.build_request("POST", "/", [("Content-Length", "1001")]))
        assert refused.status == 413
        assert app.calls == 0
        # The limit itself is allowed, and the hub is still serving.
        await _post_and_check(pair, b"x" * 1000)
    assert app.calls == 1


@pytest_twisted.ensureDeferred
async def test_max_body_chunked_upload_gets_413() -> None:
    app = Echo()
    head = h.build_request("POST", "/", [("Transfer-Encoding", "chunked")])
    async with running_pair(app, hub_config=HubConfig(max_body=1000)) as pair:
        port = pair.hub.consumer_port
        refused = await call(h.exchange, port, head + h.chunked([b"a" * 600] * 3))
        assert refused.status == 413
        assert app.calls == 0
        accepted = echoed(await call(h.exchange, port, head + h.chunked([b"a" * 600, b"b" * 400])))
        assert accepted["body_length"] == 1000
    assert app.calls == 1


@pytest_twisted.ensureDeferred
async def test_oversized_header_block_gets_431() -> None:
    app = Echo()
    many = [(f"X-Filler-{i:03d}", "f" * 100) for i in range(200)]  # ~23 kB > 16 kB
    async with running_pair(app) as pair:
        port = pair.hub.consumer_port
        refused = await call(h.request, port, "GET", "/", many)
        assert refused.status == 431
        one_long_line = await call(h.request, port, "GET", "/", [("X-Long", "l" * 20000)])
        assert one_long_line.status == 431
        assert app.calls == 0
        # Just under the limit still works, and the hub is still up.
        fits = [(f"X-Filler-{i:03d}", "f" * 100) for i in range(120)]  # ~14 kB
        assert echoed(await call(h.request, port, "GET", "/", fits))
    assert app.calls == 1


@pytest_twisted.ensureDeferred
async def test_overlong_request_line_gets_414() -> None:
    app = Echo()
    async with running_pair(app) as pair:
        port = pair.hub.consumer_port
        refused = await call(h.request, port, "GET", "/" + "a" * 20000)
        assert refused.status == 414
        assert app.calls == 0
        fine = environ_of(await call(h.request, port, "GET", "/" + "a" * 8000))
        assert fine["PATH_INFO"] == "/" + "a" * 8000
    assert app.calls == 1


# --------------------------------------------------------------------------
# Response side
# --------------------------------------------------------------------------

STATUSES = {
    "/299": "299 Custom Reason",
    "/201": "201 Created",
    "/404": "404 Nothing Here At All",
    "/418": "418 I'm a teapot",
    "/503": "503 Service Unavailable",
}


def status_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = b"status body"
    start_response(STATUSES[environ["PATH_INFO"]], [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest_twisted.ensureDeferred
async def test_status_code_and_reason_phrase_unchanged() -> None:
    async with running_pair(status_app) as pair:
        for path, status in STATUSES.items():
            response = await call(h.request, pair.hub.consumer_port, "GET", path)
            assert f"{response.status} {response.reason.decode('latin-1')}" == status
            assert response.body == b"status body"


RESPONSE_HEADERS = [
    ("Content-Type", "application/x-pothead-test; charset=latin-1"),
    ("Set-Cookie", "a=1; Path=/; HttpOnly"),
    ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Secure"),
    ("Set-Cookie", "c=3"),
    ("X-Custom", "some value, with a comma"),
    ("X-Repeated", "one"),
    ("X-Repeated", "two"),
    ("Cache-Control", "private, max-age=0"),
    ("ETag", '"v1"'),
    ("Link", "</style.css>; rel=preload; as=style"),
    ("Location", "/elsewhere?x=%20y"),
    ("X-Latin1", "caf\u00e9"),
]


@pytest_twisted.ensureDeferred
async def test_response_headers_unchanged_including_several_set_cookie() -> None:
    body = b"headers body"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", RESPONSE_HEADERS + [("Content-Length", str(len(body)))])
        return [body]

    async with running_pair(app) as pair:
        response = await call(h.request, pair.hub.consumer_port, "GET", "/")
    assert response.status == 200
    assert response.body == body
    for name in {name for name, _ in RESPONSE_HEADERS}:
        expected = [value.encode("latin-1") for n, value in RESPONSE_HEADERS if n == name]
        assert response.values(name.encode()) == expected, name
    assert response.values(b"content-length") == [b"%d" % len(body)]
    assert response.values(b"transfer-encoding") == []


@pytest_twisted.ensureDeferred
async def test_no_content_type_is_invented() -> None:
    """A response without Content-Type must not get one added (e.g. twisted.web's text/html default)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "7")])
        return [b"no type"]

    async with running_pair(app) as pair:
        response = await call(h.request, pair.hub.consumer_port, "GET", "/")
    assert (response.status, response.body) == (200, b"no type")
    assert response.values(b"content-type") == []


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_headers_are_removed() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "200 OK",
            [
                ("Content-Length", "2"),
                ("Keep-Alive", "timeout=99"),
                ("Proxy-Authenticate", "Basic realm=x"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "example/1.0"),
                ("X-Kept", "yes"),
            ],
        )
        return [b"ok"]

    async with running_pair(app) as pair:
        response = await call(h.request, pair.hub.consumer_port, "GET", "/")
    assert (response.status, response.body) == (200, b"ok")
    assert response.values(b"x-kept") == [b"yes"]
    for name in (b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert response.values(name) == [], name


@pytest_twisted.ensureDeferred
async def test_response_headers_named_in_worker_connection_header_are_removed() -> None:
    """The worker's own Connection header names hop-by-hop headers that must not reach the consumer."""
    hub = await start_hub(reactor)
    try:
        reply = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close, X-Worker-Hop\r\n"
            b"X-Worker-Hop: secret\r\nX-Kept: yes\r\n\r\nfine"
        )
        worker = call(fake_worker, hub.worker_port, reply)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        response = await call(h.request, hub.consumer_port, "GET", "/")
        await worker
    finally:
        await hub.service.stopService()
    assert (response.status, response.body) == (200, b"fine")
    assert response.values(b"x-kept") == [b"yes"]
    assert response.values(b"x-worker-hop") == []


@pytest_twisted.ensureDeferred
async def test_http10_consumer_gets_an_unframed_body_delimited_by_close() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"part one, ", b"part two"])

    async with running_pair(app) as pair:
        request = b"GET /old HTTP/1.0\r\nHost: pothead.test\r\n\r\n"
        response = await call(h.exchange, pair.hub.consumer_port, request)
    assert response.status == 200
    assert response.values(b"transfer-encoding") == []
    assert response.body == b"part one, part two"


@pytest_twisted.ensureDeferred
async def test_head_passes_content_length_without_body() -> None:
    resource = b"r" * 12345

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(resource)))])
        return [resource]  # as many apps do, even for HEAD

    def client(port: int) -> tuple[h.Response, h.Response]:
        # HEAD then GET on one consumer connection: a stray body after the
        # HEAD response would be parsed as the GET's status line.
        with h.connect(port) as sock:
            reader = h.Reader(sock)
            sock.sendall(h.build_request("HEAD", "/resource", close=False))
            head = h.read_response(reader, head_request=True)
            sock.sendall(h.build_request("GET", "/resource"))
            return head, h.read_response(reader)

    async with running_pair(app) as pair:
        head, get = await call(client, pair.hub.consumer_port)
    assert head.status == 200
    assert head.values(b"content-length") == [b"12345"]
    assert head.values(b"transfer-encoding") == []
    assert (get.status, get.body) == (200, resource)


@pytest_twisted.ensureDeferred
async def test_204_and_304_have_no_body() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/204":
            start_response("204 No Content", [("X-Kind", "no-content")])
            return []
        if path == "/304":
            start_response("304 Not Modified", [("ETag", '"v1"'), ("X-Kind", "not-modified")])
            return []
        start_response("200 OK", [("Content-Length", "4"), ("Content-Type", "text/plain")])
        return [b"done"]

    def client(port: int) -> list[tuple[h.Response, bytes]]:
        # All on one consumer connection: any body bytes after a 204/304 head
        # would end up in front of the next response.
        out = []
        with h.connect(port) as sock:
            reader = h.Reader(sock)
            for path, close in (("/204", False), ("/304", False), ("/200", True)):
                sock.sendall(h.build_request("GET", path, close=close))
                response = h.read_response(reader)
                out.append((response, reader.buffer))
        return out

    async with running_pair(app) as pair:
        (nc, after_nc), (nm, after_nm), (ok, _) = await call(client, pair.hub.consumer_port)
    assert nc.status == 204 and nc.values(b"x-kind") == [b"no-content"]
    assert nc.values(b"transfer-encoding") == []
    assert nc.values(b"content-length") in ([], [b"0"])
    assert nm.status == 304 and nm.values(b"etag") == [b'"v1"'] and nm.values(b"x-kind") == [b"not-modified"]
    assert nm.values(b"transfer-encoding") == []
    assert after_nc == after_nm == b""
    assert (ok.status, ok.body) == (200, b"done")


@pytest_twisted.ensureDeferred
async def test_response_body_streams_as_it_is_produced() -> None:
    """The consumer gets the first chunk while the app is still blocked before the second."""
    release = threading.Event()
    app_state = {"second_produced": False, "release_timed_out": False}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterable[bytes]:
            yield b"first chunk;"
            if not release.wait(10):
                app_state["release_timed_out"] = True
            app_state["second_produced"] = True
            yield b"second chunk"

        return body()

    async with running_pair(app) as pair:
        received: list[bytes] = []
        state_at_first_data: dict[str, bool] = {}

        def collect(data: bytes) -> None:
            if not received:
                state_at_first_data.update(app_state)
                release.set()
            received.append(data)

        try:
            response = await treq.get(pair.url("/stream"), persistent=False)
            assert response.code == 200
            await treq.collect(response, collect)
        finally:
            release.set()
    assert state_at_first_data == {"second_produced": False, "release_timed_out": False}
    assert b"".join(received) == b"first chunk;second chunk"


BIG_TOTAL = 64 * 1024 * 1024
BIG_CHUNK = 64 * 1024


def big_chunk(i: int) -> bytes:
    return i.to_bytes(8, "big") * (BIG_CHUNK // 8)


def big_body_sha256() -> str:
    digest = hashlib.sha256()
    for i in range(BIG_TOTAL // BIG_CHUNK):
        digest.update(big_chunk(i))
    return digest.hexdigest()


class BigBody:
    """Yields BIG_TOTAL bytes in BIG_CHUNK pieces, counting what it produced."""

    def __init__(self) -> None:
        self.produced = 0  # written by the one WSGI thread, read by the test

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(BIG_TOTAL))])
        return self._body()

    def _body(self) -> Iterable[bytes]:
        for i in range(BIG_TOTAL // BIG_CHUNK):
            self.produced += BIG_CHUNK
            yield big_chunk(i)


def slow_consumer(port: int, stalled: threading.Event, resume: threading.Event, first: int) -> dict[str, Any]:
    """Read the head and ``first`` body bytes, stop reading until ``resume``, then read the rest."""
    with h.connect(port, rcvbuf=65536, timeout=30) as sock:
        sock.sendall(h.build_request("GET", "/big"))
        reader = h.Reader(sock)
        _, status, _, headers = h.parse_head(reader.read_until(b"\r\n\r\n"))
        digest = hashlib.sha256()
        count = 0
        while count < first:
            data = reader.read_some(first - count)
            if not data:
                break
            digest.update(data)
            count += len(data)
        stalled.set()
        if not resume.wait(30):
            raise TimeoutError("the test never resumed the consumer")
        while True:
            data = reader.read_some(1 << 20)
            if not data:
                break
            digest.update(data)
            count += len(data)
        return {"status": status, "headers": headers, "count": count, "sha256": digest.hexdigest()}


@pytest_twisted.ensureDeferred
async def test_backpressure_slow_consumer_stalls_the_app_without_hub_buffering() -> None:
    app = BigBody()
    process = psutil.Process()
    async with running_pair(app) as pair:
        stalled, resume = threading.Event(), threading.Event()
        rss_before = process.memory_info().rss
        consumer = call(slow_consumer, pair.hub.consumer_port, stalled, resume, 256 * 1024)
        try:
            await wait_until(reactor, stalled.is_set, timeout=20)
            # Wait until the app stops making progress (it is pulled only as
            # fast as the data can go), bounded.
            last, stable_since = -1, reactor.seconds()
            deadline = reactor.seconds() + 20
            while reactor.seconds() - stable_since < 0.6:
                assert reactor.seconds() < deadline, f"the app never stalled: {app.produced} bytes produced"
                if app.produced != last:
                    last, stable_since = app.produced, reactor.seconds()
                await sleep(reactor, 0.05)
            produced_while_stalled = app.produced
            rss_growth = process.memory_info().rss - rss_before
        finally:
            resume.set()
        result = await consumer
    # Only socket buffers (kernel) and a few chunks may be in flight, far from the whole body.
    assert produced_while_stalled <= BIG_TOTAL // 2, f"app produced {produced_while_stalled} bytes of {BIG_TOTAL}"
    assert rss_growth < 24 * 1024 * 1024, f"process memory grew by {rss_growth} bytes"
    assert result["status"] == 200
    assert result["count"] == BIG_TOTAL
    assert result["sha256"] == await call(big_body_sha256)
    assert app.produced == BIG_TOTAL


# --------------------------------------------------------------------------
# Keep-alive on worker connections
# --------------------------------------------------------------------------


class ConnectionRecorder:
    """Records, per job, the worker's local port of the connection it came on."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # On the worker, the hub is the peer: SERVER_PORT is the local port
        # of the worker's outgoing connection, i.e. it names the connection.
        self.jobs.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["SERVER_PORT"]))
        environ["wsgi.input"].read()
        path = environ["PATH_INFO"]
        if path == "/chunked":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter([b"chunked ", b"body"])
        if path == "/204":
            start_response("204 No Content", [])
            return []
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]


@pytest_twisted.ensureDeferred
async def test_sequential_jobs_reuse_one_worker_connection() -> None:
    app = ConnectionRecorder()
    requests = [("GET", "/length"), ("GET", "/chunked"), ("HEAD", "/length"), ("GET", "/204"), ("POST", "/length"),
                ("GET", "/length")]
    async with running_pair(app, threads=1) as pair:
        totals = pair.hub.service.hub.totals
        assert totals["worker_connected"] == 1
        for method, path in requests:
            body = b"some body" if method == "POST" else None
            response = await call(h.request, pair.hub.consumer_port, method, path, [], body)
            assert response.status in (200, 204), (method, path, response.status)
        assert totals["worker_connected"] == 1
        assert totals["worker_disconnected"] == 0
    assert [(m, p) for m, p, _ in app.jobs] == requests
    assert len({port for _, _, port in app.jobs}) == 1, app.jobs


@pytest_twisted.ensureDeferred
async def test_worker_without_keep_alive_gets_a_fresh_connection_per_job() -> None:
    app = ConnectionRecorder()
    async with running_pair(app, threads=1, worker_config=WorkerConfig(keep_alive=False)) as pair:
        for i in range(3):
            response = await call(h.request, pair.hub.consumer_port, "GET", f"/job{i}")
            assert (response.status, response.body) == (200, b"hello")
        assert pair.hub.service.hub.totals["worker_connected"] >= 3
    ports = [port for _, _, port in app.jobs]
    assert len(ports) == 3 and len(set(ports)) == 3, app.jobs
