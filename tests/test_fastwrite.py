"""
pothead.fastwrite.write_now on real loopback TCP connections: sent at once
when nothing is buffered, handed to Twisted otherwise, order always kept.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from pothead.fastwrite import write_now
from pothead.testing import wait_until


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Hold(Protocol):
    """The server side: keeps its transport for the test to write on."""

    connected_d: Deferred[Any]

    def connectionMade(self) -> None:
        self.connected_d.callback(self)


async def _pair() -> tuple[Any, Collect, Any]:
    connected: Deferred[Any] = Deferred()

    def build() -> Hold:
        hold = Hold()
        hold.connected_d = connected
        return hold

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(build))
    client = Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
    server = await connected
    return port, client, server


@pytest_twisted.ensureDeferred
async def test_small_write_leaves_nothing_buffered_and_arrives() -> None:
    port, client, server = await _pair()
    try:
        write_now(server.transport, b"hello")
        # Sent by the call itself: Twisted's buffers stay empty.
        assert server.transport.dataBuffer == b"" and server.transport._tempDataLen == 0
        await wait_until(reactor, lambda: client.data == b"hello", timeout=5)
    finally:
        server.transport.loseConnection()
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_order_is_kept_behind_buffered_data_and_for_large_writes() -> None:
    port, client, server = await _pair()
    try:
        big = bytes(range(256)) * 40000  # 10 MB: more than the kernel takes at once
        server.transport.write(b"first ")  # buffered by Twisted, not yet sent
        write_now(server.transport, b"second ")  # must queue behind it
        write_now(server.transport, big)
        write_now(server.transport, b" last")
        expected = b"first second " + big + b" last"
        await wait_until(reactor, lambda: len(client.data) >= len(expected), timeout=20)
        assert client.data == expected
    finally:
        server.transport.loseConnection()
        client.transport.loseConnection()
        await port.stopListening()


def test_other_transports_get_an_ordinary_write() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"
