"""
A service that listens on one Twisted server endpoint string.

Like ``StreamServerEndpointService`` but it exposes the bound port
(:meth:`when_listening`) and can stop listening on its own, which the hub's
drain needs (close the consumer port, keep the worker port).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError


def parse_server_endpoint(reactor: Any, description: str, option: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, LookupError) as e:
        if isinstance(e, LookupError) and description.startswith("systemd:"):
            raise ConfigError(f"{option}: {description!r}: {_systemd_sockets()}") from None
        raise ConfigError(
            f"{option}: {description!r} is not a server endpoint ({e}); use e.g. tcp:8080, "
            "tcp:port=8080:interface=127.0.0.1, unix:/run/pothead.sock or systemd:domain=INET:index=0"
        ) from None


def _systemd_sockets() -> str:
    """What systemd passed us, for an error about a ``systemd:`` endpoint that found no socket."""
    import os

    pid, fds, names = (os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if pid is None or fds is None:
        return "no socket inherited from systemd (LISTEN_PID/LISTEN_FDS unset: start it through its .socket unit)"
    if pid != str(os.getpid()):
        return f"the inherited sockets are for pid {pid}, not this process ({os.getpid()})"
    if names is None or not fds.isdigit() or len(names.split(":")) != int(fds):
        return f"LISTEN_FDNAMES={names!r} must name each of the LISTEN_FDS={fds} sockets"
    return f"no such socket among the {fds} inherited (names: {names}); check index= / name= against the .socket unit"


class Listener(Service):
    """Listens on ``description`` with ``factory`` while running."""

    _log = Logger()

    def __init__(
        self, reactor: Any, description: str, factory: IProtocolFactory, role: str, option: str | None = None
    ) -> None:
        self.description = description
        self.role = role
        self.option = option or f"--{role}"
        self._endpoint = parse_server_endpoint(reactor, description, self.option)
        self._started = False
        self._factory = factory
        self._port: IListeningPort | None = None
        self._waiting: list[Deferred[IListeningPort]] = []
        self._failure: Failure | None = None

    def privilegedStartService(self) -> None:
        """
        Bind now: twistd calls this before the reactor runs (and before it
        drops privileges).  TCP, unix and systemd endpoints answer at once, so
        a port that cannot be bound ends the process with one line.
        """
        super().privilegedStartService()
        self._listen()
        if self._failure is not None:
            raise SystemExit(
                f"pothead: cannot listen for {self.role} on {self.option} {self.description}: "
                f"{self._failure.getErrorMessage()}"
            )

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._started:
            return
        self._started = True
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self._log.info("listening for {role} on {address}", role=self.role, address=_describe(port))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _failed(self, failure: Failure) -> None:
        self._failure = failure
        self._log.critical(
            "cannot listen for {role} on {description}: {error}",
            role=self.role,
            description=self.description,
            error=failure.getErrorMessage(),
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        if self._port is not None:
            return succeed(self._port)
        d: Deferred[IListeningPort] = Deferred()
        if self._failure is not None:
            d.errback(self._failure)
        else:
            self._waiting.append(d)
        return d

    @property
    def port(self) -> IListeningPort | None:
        return self._port

    def stop_listening(self) -> Deferred[None]:
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return _as_deferred(port.stopListening())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop_listening()


def _as_deferred(result: Any) -> Deferred[None]:
    if isinstance(result, Deferred):
        return result
    return succeed(None)


def _describe(port: IListeningPort) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    number = getattr(address, "port", None)
    if host is not None and number is not None:
        return f"{host}:{number}"
    return str(getattr(address, "name", address))
