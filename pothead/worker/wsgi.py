"""
Running the user's WSGI application: loading it, and the thin layer between
``twisted.web.wsgi`` and the app (request id, error pages, flow control).

Everything here except :func:`load_app` runs in a WSGI thread.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import INTERNAL_SERVER_ERROR
from twisted.web.wsgi import _WSGIResponse

from ..config import ConfigError

if TYPE_CHECKING:
    from .redirect import Parking

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_log = Logger(namespace="pothead.worker.app")


def load_app(spec: str) -> Any:
    """``"package.module:attribute"`` -> the object; errors are one clear line."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"app: {spec!r} is not MODULE:ATTRIBUTE (for example myapp.wsgi:application)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # Like the reference worker: apps next to where the worker runs import.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                f"app: cannot import module {module_name!r} ({e}); check the name and that it is on PYTHONPATH"
            ) from None
        raise ConfigError(f"app: importing {module_name!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError(f"app: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"app: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(obj):
        raise ConfigError(f"app: {spec!r} is not callable; it must be a WSGI application")
    return obj


class Flow:
    """
    Backpressure for one response, between the reactor and a WSGI thread.

    Registered as a push producer on the twisted.web request: the reactor
    pauses it when the connection's send buffer is full; the WSGI thread waits
    in :meth:`wait` before producing the next chunk, so the app's iterator is
    pulled only as fast as the peer reads.
    """

    #: Chunks handed to the reactor thread and not yet written there: the
    #: WSGI thread runs at most this far ahead of the connection.
    MAX_IN_FLIGHT = 4

    def __init__(self) -> None:
        self._writable = threading.Event()
        self._writable.set()
        self._in_flight = threading.BoundedSemaphore(self.MAX_IN_FLIGHT)
        self.stopped = False

    # IPushProducer, called in the reactor thread
    def pauseProducing(self) -> None:
        self._writable.clear()

    def resumeProducing(self) -> None:
        self._writable.set()

    def stopProducing(self) -> None:
        self.stopped = True
        self._writable.set()

    # called in the WSGI thread
    def wait(self) -> None:
        while not self._writable.wait(1.0):
            if self.stopped:
                return

    def reserve(self) -> bool:
        """Before handing a chunk to the reactor (WSGI thread): False once stopped."""
        while not self._in_flight.acquire(timeout=1.0):
            if self.stopped:
                return False
        return True

    def written(self) -> None:
        """A reserved chunk was written, or dropped (reactor thread)."""
        self._in_flight.release()


class JobResponse(_WSGIResponse):
    """
    ``twisted.web.wsgi``'s response with fewer thread hops per job.

    twisted.web writes each chunk with ``blockingCallFromThread`` (the WSGI
    thread waits for the reactor, twice a thread switch) and finishes with
    one more ``callFromThread``; the job's end was yet another.  Here a
    chunk is handed over without waiting (at most :attr:`Flow.MAX_IN_FLIGHT`
    ahead, and never while the connection is paused: see :class:`Flow`), and
    the end of the response and the end of the app's call travel together:
    a one-chunk response costs two hops, into the thread and back.

    ``on_returned`` is called in the reactor thread once the app's call is
    over, whichever way it ended, right after the response was finished.
    """

    def __init__(
        self, reactor: Any, threadpool: Any, application: Any, request: Any, flow: Flow, on_returned: Callable[[], None]
    ) -> None:
        super().__init__(reactor, threadpool, application, request)
        self._flow = flow
        self._on_returned = on_returned

    def write(self, data: bytes) -> None:  # WSGI thread
        started, self.started = self.started, True
        if not self._flow.reserve():
            return  # the connection is gone; run() notices _requestFinished
        self.reactor.callFromThread(self._write_now, data, started)

    def _write_now(self, data: bytes, started: bool) -> None:  # reactor thread
        try:
            if not self._requestFinished:
                if not started:
                    self._sendResponseHeaders()
                self.request.write(data)
        finally:
            self._flow.written()

    def run(self) -> None:  # WSGI thread
        try:
            chunks = self.application(self.environ, self.startResponse)
            try:
                for chunk in chunks:
                    if chunk:
                        self.write(chunk)
                    if self._requestFinished:
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException:
            self.reactor.callFromThread(self._failed, self.started, Failure())
        else:
            self.reactor.callFromThread(self._done, self.started)
        self.started = True

    def _done(self, started: bool) -> None:  # reactor thread
        try:
            if not self._requestFinished:
                if not started:
                    self._sendResponseHeaders()
                self.request.finish()
        finally:
            self._on_returned()

    def _failed(self, started: bool, failure: Failure) -> None:  # reactor thread
        try:
            self._log.failure("WSGI application error", failure=failure)
            if not self._requestFinished:
                if started:
                    self.request.loseConnection()
                else:
                    self.request.setResponseCode(INTERNAL_SERVER_ERROR)
                    self.request.finish()
        finally:
            self._on_returned()


def error_page(request_id: str) -> bytes:
    return f"500 Internal Server Error: the application failed (request id {request_id})\n".encode()


def job_app(
    app: WSGIApp,
    request_id: str,
    flow: Flow,
    prepare_environ: Callable[[dict[str, Any]], None] | None = None,
    parking: Parking | None = None,
    on_return: Callable[[], None] | None = None,
) -> WSGIApp:
    """
    ``app`` as seen by one job: ``REQUEST_ID`` in its environ (and whatever
    ``prepare_environ`` adds: the gate's ``request_received`` runs there), a
    500 page carrying the request id when it fails before sending anything,
    and each chunk pulled only when the connection can take it.

    With ``parking`` (``--redirect-response``) a ``200`` is parked when it is
    about to start, and this thread streams it to the consumer who fetches it
    (see :mod:`pothead.worker.redirect`); the app's iterator is closed, and
    the job ends, only after that.  ``on_return`` is called (in this thread)
    when the app's call is over, whichever way it ended.
    """

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        environ["REQUEST_ID"] = request_id
        sent_body = False
        result: Iterable[bytes] | None = None
        respond = parking.wrap(start_response) if parking is not None else start_response
        try:
            if prepare_environ is not None:
                prepare_environ(environ)
            result = app(environ, respond)
            chunks = iter(result)
            for chunk in chunks:
                if parking is not None and not parking.decided and chunk:
                    if parking.offer(chunk, chunks):
                        return
                if chunk:
                    sent_body = True
                yield chunk
                flow.wait()
            if parking is not None and not parking.decided:
                parking.offer(None, chunks)
        except GeneratorExit:
            raise
        except Exception:
            _log.failure("[{request_id}] application error", request_id=request_id)
            if sent_body:
                raise  # twisted.web drops the connection: the peer sees a truncated body
            body = error_page(request_id)
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
                sys.exc_info(),
            )
            yield body
        finally:
            try:
                try:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                finally:
                    if parking is not None:
                        parking.release()
            finally:
                if on_return is not None:
                    on_return()

    return application
