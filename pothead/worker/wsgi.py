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

    def __init__(self) -> None:
        self._writable = threading.Event()
        self._writable.set()
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
