"""
Unit tests of the pure header rules (:mod:`pothead.headers`) and of the
option parsers in :mod:`pothead.config`.
"""

from __future__ import annotations

import re

import pytest

from pothead.config import ConfigError, parse_count, parse_seconds, parse_size
from pothead.headers import (
    asks_requeue,
    choose_request_id,
    connection_tokens,
    end_to_end,
    forwarded_request_headers,
    header_value,
    is_hop_by_hop,
    new_request_id,
)

HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def forward(headers: list[tuple[bytes, bytes]], **kwargs: object) -> list[tuple[bytes, bytes]]:
    options: dict[str, object] = {
        "client_address": "203.0.113.7",
        "scheme": "http",
        "host": b"api.example",
        "request_id": "rid-1",
    }
    options.update(kwargs)
    return forwarded_request_headers(headers, **options)  # type: ignore[arg-type]


# -- hop-by-hop ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Proxy-Connection",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"proxy-anything-else",
        b"PROXY-X",
        b"transfer-ENCODING",
    ],
)
def test_hop_by_hop_names(name: bytes) -> None:
    assert is_hop_by_hop(name)
    assert end_to_end([(name, b"v"), (b"Accept", b"*/*")]) == [(b"Accept", b"*/*")]


@pytest.mark.parametrize(
    "name", [b"Accept", b"Content-Type", b"Authorization", b"X-Proxy", b"Proxyish", b"Connections", b"Cookie"]
)
def test_end_to_end_names(name: bytes) -> None:
    assert not is_hop_by_hop(name)
    assert end_to_end([(name, b"v")]) == [(name, b"v")]


def test_headers_named_in_connection_are_dropped_with_odd_spacing_and_case() -> None:
    headers = [
        (b"Accept", b"*/*"),
        (b"connection", b"  X-Secret ,\tKEEP-ALIVE,,x-other  "),
        (b"X-Secret", b"1"),
        (b"x-OTHER", b"2"),
        (b"X-Kept", b"3"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    assert connection_tokens(headers) == {b"x-secret", b"keep-alive", b"x-other"}
    assert end_to_end(headers) == [(b"Accept", b"*/*"), (b"X-Kept", b"3")]


def test_several_connection_headers_all_count() -> None:
    headers = [
        (b"Connection", b"x-a"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"CONNECTION", b"X-B, close"),
        (b"X-C", b"3"),
    ]
    assert connection_tokens(headers) == {b"x-a", b"x-b", b"close"}
    assert end_to_end(headers) == [(b"X-C", b"3")]


def test_connection_named_header_before_the_connection_header_is_dropped_too() -> None:
    # The Connection header can come after the header it names.
    headers = [(b"X-Early", b"1"), (b"Accept", b"a"), (b"Connection", b"x-early")]
    assert end_to_end(headers) == [(b"Accept", b"a")]


def test_end_to_end_keeps_order_and_repeats() -> None:
    headers = [
        (b"Set-Cookie", b"a=1"),
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive"),
        (b"Set-Cookie", b"b=2"),
        (b"Vary", b"Accept"),
        (b"Set-Cookie", b"c=3"),
        (b"Vary", b"Origin"),
    ]
    assert end_to_end(headers) == [
        (b"Set-Cookie", b"a=1"),
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"b=2"),
        (b"Vary", b"Accept"),
        (b"Set-Cookie", b"c=3"),
        (b"Vary", b"Origin"),
    ]


def test_end_to_end_drop_is_case_insensitive() -> None:
    headers = [(b"Content-Length", b"3"), (b"X-Y", b"1"), (b"Accept", b"a")]
    assert end_to_end(headers, drop=[b"CONTENT-length", b"x-y"]) == [(b"Accept", b"a")]


# -- what the hub forwards to a worker ---------------------------------------------


def test_forwarded_request_headers_full_picture() -> None:
    consumer = [
        (b"Host", b"api.example"),
        (b"User-Agent", b"curl/8"),
        (b"Accept", b"a"),
        (b"Accept", b"b"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Zm9v"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"12"),
        (b"Expect", b"100-continue"),
        (b"Upgrade", b"websocket"),
        (b"Cookie", b"x=1"),
    ]
    out = forward(consumer)
    assert out == [
        (b"Host", b"api.example"),
        (b"User-Agent", b"curl/8"),
        (b"Accept", b"a"),
        (b"Accept", b"b"),
        (b"Cookie", b"x=1"),
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"api.example"),
        (b"X-Request-Id", b"rid-1"),
        (b"Pothead-Reuse", b"1"),
    ]


def test_x_forwarded_for_is_appended_to_an_existing_chain() -> None:
    out = forward(
        [
            (b"X-Forwarded-For", b"198.51.100.1"),
            (b"Accept", b"a"),
            (b"x-forwarded-for", b"198.51.100.2, 198.51.100.3"),
        ],
        client_address="10.0.0.9",
    )
    values = [v for n, v in out if n.lower() == b"x-forwarded-for"]
    assert values == [b"198.51.100.1, 198.51.100.2, 198.51.100.3, 10.0.0.9"]
    assert (b"Accept", b"a") in out


def test_x_forwarded_for_with_ipv6_client() -> None:
    out = forward([], client_address="2001:db8::1")
    assert header_value(out, b"x-forwarded-for") == b"2001:db8::1"


def test_no_client_address_leaves_x_forwarded_for_alone() -> None:
    out = forward([(b"X-Forwarded-For", b"198.51.100.1")], client_address=None)
    assert [v for n, v in out if n.lower() == b"x-forwarded-for"] == [b"198.51.100.1"]
    assert header_value(forward([], client_address=None), b"x-forwarded-for") is None


def test_x_forwarded_proto_and_host() -> None:
    out = forward([], scheme="https", host=b"shop.example:8443")
    assert header_value(out, b"x-forwarded-proto") == b"https"
    assert header_value(out, b"x-forwarded-host") == b"shop.example:8443"
    # No Host (HTTP/1.0 without one): no X-Forwarded-Host is invented.
    assert header_value(forward([], host=None), b"x-forwarded-host") is None


def test_x_forwarded_proto_and_host_from_an_earlier_proxy_are_kept_when_trusted() -> None:
    out = forward(
        [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"public.example")],
        scheme="http",
        host=b"internal:8080",
        trust_forwarded=True,
    )
    assert [v for n, v in out if n.lower() == b"x-forwarded-proto"] == [b"https"]
    assert [v for n, v in out if n.lower() == b"x-forwarded-host"] == [b"public.example"]


def test_x_forwarded_proto_and_host_from_a_consumer_are_replaced_by_default() -> None:
    # Without --trust-forwarded a consumer cannot claim https or another host.
    out = forward(
        [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil.example")],
        scheme="http",
        host=b"internal:8080",
    )
    assert [v for n, v in out if n.lower() == b"x-forwarded-proto"] == [b"http"]
    assert [v for n, v in out if n.lower() == b"x-forwarded-host"] == [b"internal:8080"]


def test_request_id_replaces_the_consumers_header_exactly_once() -> None:
    out = forward([(b"X-Request-Id", b"from-consumer"), (b"x-request-id", b"second")], request_id="chosen")
    assert [v for n, v in out if n.lower() == b"x-request-id"] == [b"chosen"]


def test_pothead_headers_from_consumers_are_dropped() -> None:
    out = forward(
        [
            (b"Pothead-Requeue", b"1"),
            (b"POTHEAD-REUSE", b"1"),
            (b"pothead-anything", b"x"),
            (b"X-Pothead", b"kept"),
        ],
        reuse=False,
    )
    assert [n for n in names(out) if n.startswith(b"pothead-")] == []
    assert (b"X-Pothead", b"kept") in out


def test_pothead_reuse_only_from_the_hub() -> None:
    assert [v for n, v in forward([(b"Pothead-Reuse", b"0")]) if n.lower() == b"pothead-reuse"] == [b"1"]
    assert header_value(forward([(b"Pothead-Reuse", b"1")], reuse=False), b"pothead-reuse") is None


def test_forwarding_does_not_mutate_its_input() -> None:
    consumer = [(b"Connection", b"x-a"), (b"X-A", b"1"), (b"Accept", b"a")]
    copy = list(consumer)
    forward(consumer)
    assert consumer == copy


# -- request ids ------------------------------------------------------------------------


def test_new_request_id_is_random_hex() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(HEX32.match(i) for i in ids)


@pytest.mark.parametrize(
    "value, kept",
    [
        (b"abc-123", "abc-123"),
        (b"  padded-id\t", "padded-id"),
        (b"x" * 200, "x" * 200),
        (b"!#$%&'*+-.^_`|~:/=?@[]{}", "!#$%&'*+-.^_`|~:/=?@[]{}"),
    ],
)
def test_sane_request_id_is_kept(value: bytes, kept: str) -> None:
    assert choose_request_id([(b"Accept", b"a"), (b"X-REQUEST-ID", value)]) == kept


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"x" * 201,
        b"has space",
        b"tab\there",
        b"nul\x00byte",
        b"bell\x07",
        b"del\x7f",
        b"line\r\nX-Injected: 1",
        "caf\u00e9".encode("utf-8"),
        b"\xff\xfe",
    ],
)
def test_insane_request_id_is_replaced(value: bytes) -> None:
    chosen = choose_request_id([(b"X-Request-Id", value)])
    assert HEX32.match(chosen), chosen
    assert chosen != value.decode("latin-1")


def test_absent_request_id_is_generated() -> None:
    first = choose_request_id([(b"Accept", b"a")])
    second = choose_request_id([])
    assert HEX32.match(first) and HEX32.match(second) and first != second


# -- requeue --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, headers, expected",
    [
        (503, [(b"Pothead-Requeue", b"1")], True),
        (503, [(b"pothead-requeue", b" 1 ")], True),
        (503, [(b"Connection", b"close"), (b"POTHEAD-REQUEUE", b"1")], True),
        (503, [], False),
        (503, [(b"Pothead-Requeue", b"0")], False),
        (503, [(b"Pothead-Requeue", b"yes")], False),
        (503, [(b"Pothead-Requeue", b"")], False),
        (502, [(b"Pothead-Requeue", b"1")], False),
        (200, [(b"Pothead-Requeue", b"1")], False),
        (500, [(b"Pothead-Requeue", b"1")], False),
    ],
)
def test_asks_requeue(code: int, headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert asks_requeue(code, headers) is expected


def test_header_value_first_match_case_insensitive() -> None:
    headers = [(b"a", b"1"), (b"X-Thing", b"first"), (b"x-thing", b"second")]
    assert header_value(headers, b"X-THING") == b"first"
    assert header_value(headers, b"missing") is None


# -- config: sizes, seconds, counts -------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512", 512),
        ("0", 0),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("64kb", 64 * 1024),
        ("10M", 10 * 1024**2),
        ("10m", 10 * 1024**2),
        ("10MB", 10 * 1024**2),
        ("10MiB", 10 * 1024**2),
        ("10 MiB", 10 * 1024**2),
        (" 2G ", 2 * 1024**3),
        ("1.5G", 1024**3 * 3 // 2),
        ("1T", 1024**4),
        ("1b", 1),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text, "--max-body") == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "M", "10X", "ten", "-5", "1.2.3", "10kk", "1e6", "10 M B", "0x10", "10MiBs", "--1k"]
)
def test_parse_size_garbage_is_one_helpful_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text, "--max-body")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--max-body:")
    assert repr(text) in message
    assert "64k" in message and "10M" in message  # says what would work


@pytest.mark.parametrize(
    "text, expected",
    [
        ("30", 30.0),
        ("2.5", 2.5),
        (" 7 ", 7.0),
        (4, 4.0),
        (0.25, 0.25),
        ("0", None),
        (0, None),
        ("none", None),
        ("OFF", None),
        ("never", None),
        (" inf ", None),
        (None, None),
    ],
)
def test_parse_seconds(text: object, expected: float | None) -> None:
    assert parse_seconds(text, "--queue-timeout") == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["abc", "", "5s", "-1", "-0.5", "nan", "1,5"])
def test_parse_seconds_errors(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_seconds(text, "--queue-timeout")
    message = str(caught.value)
    assert message.startswith("--queue-timeout:") and "\n" not in message


def test_parse_seconds_zero_refused_where_a_limit_is_required() -> None:
    with pytest.raises(ConfigError, match="--reconnect-max: must be > 0"):
        parse_seconds("0", "--reconnect-max", allow_zero=False)
    assert parse_seconds("0.5", "--reconnect-max", allow_zero=False) == 0.5


@pytest.mark.parametrize("text, expected", [("0", 0), ("5", 5), (" 12 ", 12), (3, 3), (None, None)])
def test_parse_count(text: object, expected: int | None) -> None:
    assert parse_count(text, "--max-queue") == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["abc", "", "1.5", "5k", "1e3"])
def test_parse_count_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"\A--max-queue: .* is not a whole number\Z"):
        parse_count(text, "--max-queue")


def test_parse_count_minimum() -> None:
    with pytest.raises(ConfigError, match=r"\A--threads: must be >= 1, got 0\Z"):
        parse_count("0", "--threads", minimum=1)
    with pytest.raises(ConfigError, match=r"must be >= 0, got -3"):
        parse_count("-3", "--max-queue")
    assert parse_count("1", "--threads", minimum=1) == 1
