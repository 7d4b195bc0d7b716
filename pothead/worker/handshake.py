"""
The worker's side of the PTTH upgrade (see :mod:`pothead.ptth`).

:class:`Handshake` sits in front of the reverse server channel on a new hub
connection: it sends the upgrade with the worker token, waits for ``101``,
and only then connects the channel to the transport -- so no request can be
served on a connection the hub has not accepted.  A refusal (401) or a
garbled answer closes the connection and counts as a failed attempt
(reconnect with backoff), logged with the hub's reason.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..ptth import MAX_HEAD, check_switching, split_head, upgrade_request


class HandshakeRefused(Exception):
    """The hub did not accept our upgrade (or closed during it)."""


@implementer(IHandshakeListener)
class Handshake(Protocol):
    """Runs the upgrade, then hands every event to ``channel``."""

    _log = Logger(namespace="pothead.worker")

    def __init__(
        self,
        channel: Protocol,
        token: bytes,
        hub: str,
        on_refused: Callable[[str], None],
    ) -> None:
        self.channel = channel
        self._token = token
        self._hub = hub
        self._on_refused = on_refused
        self._buffer = b""
        self._upgraded = False
        self._reported = False

    def connectionMade(self) -> None:
        self.transport.write(upgrade_request(self._token))

    def handshakeCompleted(self) -> None:
        """IHandshakeListener (TLS): pass it on to the channel."""
        completed = getattr(self.channel, "handshakeCompleted", None)
        if completed is not None:
            completed()

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded:
            self.channel.dataReceived(data)
            return
        self._buffer += data
        parts = split_head(self._buffer)
        if parts is None:
            if len(self._buffer) > MAX_HEAD:
                self._refused("the hub's answer to the upgrade is too long")
            return
        head, rest = parts
        self._buffer = b""
        why = check_switching(head)
        if why is not None:
            self._refused(why)
            return
        self._upgraded = True
        self.channel.makeConnection(self.transport)
        if rest:
            self.channel.dataReceived(rest)

    def _refused(self, why: str) -> None:
        if not self._reported:
            self._reported = True
            self._on_refused(why)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._upgraded:
            self.channel.connectionLost(reason)
        elif not self._reported:
            self._reported = True
            self._on_refused("the hub closed the connection during the upgrade")
