"""
``--poll-jobs``: slots granted one at a time by the app's ``wait_for_slot``.

The reference contract: ``wait_for_slot(halt)`` blocks until a job may
start and returns a *grant* whose optional ``request_received(environ)`` is
called when the job's request arrives (in the WSGI thread, before the app)
and optional ``done()`` when the job ended or the slot ended without a job.
``halt()`` turns true once the worker is stopping; ``wait_for_slot`` should
then return promptly.

:class:`SlotPoller` calls ``wait_for_slot`` on a thread of its own (never on
the reactor, never on a WSGI thread), opens one slot per grant, and asks for
the next grant at once.  A gated slot takes exactly one job, then releases its
grant and ends, so the number of slots -- and the WSGI thread pool, sized to
match -- follows the gate: never more jobs than grants, never a grant without
a thread.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .runtime import WorkerRuntime


class SlotPoller:
    """Turns grants of ``wait_for_slot`` into slots."""

    _log = Logger(namespace="pothead.worker")

    def __init__(self, runtime: WorkerRuntime, wait_for_slot: Callable[[Callable[[], bool]], Any]) -> None:
        self._runtime = runtime
        self._wait_for_slot = wait_for_slot
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="pothead-gate")
        self._halted = False
        self._asking: Deferred[Any] | None = None
        self._retry: Any = None
        self._asked_at = 0.0

    def _halt(self) -> bool:
        return self._halted

    def start(self) -> None:
        self._pool.start()
        self._ask()

    def _ask(self) -> None:
        self._retry = None
        if self._halted:
            return
        self._asked_at = self._runtime.reactor.seconds()
        asking = deferToThreadPool(self._runtime.reactor, self._pool, self._wait_for_slot, self._halt)
        self._asking = asking
        asking.addCallbacks(self._granted, self._gate_failed)

    def _granted(self, grant: Any) -> None:
        self._asking = None
        if self._halted:
            release(grant)
            return
        slot = self._runtime.add_slot(grant, gated=True)
        self._runtime.emit("slot_granted", slot=slot, waited=self._runtime.reactor.seconds() - self._asked_at)
        self._ask()

    def _gate_failed(self, failure: Failure) -> None:
        self._asking = None
        self._log.failure("wait_for_slot failed; asking again in 1 s", failure)
        if not self._halted:
            self._retry = self._runtime.reactor.callLater(1.0, self._ask)

    def stop(self) -> Deferred[None]:
        """Make ``halt()`` true, wait for a pending ``wait_for_slot`` to return, stop the gate thread."""
        self._halted = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        pending: Deferred[Any] = succeed(None)
        if self._asking is not None:
            pending = Deferred()
            self._asking.addBoth(lambda result: pending.callback(None))

        def stop_thread(_: object) -> None:
            self._pool.stop()

        return pending.addCallback(stop_thread)


def release(grant: Any) -> None:
    """Call the grant's ``done()`` if it has one; never let it raise into the reactor."""
    done = getattr(grant, "done", None)
    if done is None:
        return
    try:
        done()
    except Exception:
        Logger(namespace="pothead.worker").failure("the gate's done() raised")
