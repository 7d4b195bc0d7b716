"""
Sending small writes at once.

Twisted's ``transport.write`` buffers and sends on the reactor's next
round: an ``epoll_ctl`` to watch for writability, a poll event, the send,
and another ``epoll_ctl``.  For the hub's two writes per request (the
request to the worker, the response head and body to the consumer) that
round costs about as much as parsing the request.  :func:`write_now` sends
at once when the transport is a plain TCP socket with nothing buffered --
the common case -- and hands whatever the kernel did not take (or any
other case) to ``transport.write``, so ordering, backpressure and error
handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent immediately when that is safe."""
    if (
        type(transport) in _PLAIN_TCP
        and data
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
        and not transport.dataBuffer
        and not getattr(transport, "_tempDataLen", 1)
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write finds and reports the error
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
