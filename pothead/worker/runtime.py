"""
The worker's runtime state: the app, its thread pool, the hubs and the slots.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger, LogLevel
from twisted.python.threadpool import ThreadPool

from .channel import JobRequest, ReverseSite
from .slots import HubTarget, Slot

if TYPE_CHECKING:
    from .redirect import Redirects


class RunningJob:
    __slots__ = ("request_id", "started", "hub", "slot")

    def __init__(self, request_id: str, started: float, hub: str, slot: int) -> None:
        self.request_id = request_id
        self.started = started
        self.hub = hub
        self.slot = slot


class WorkerRuntime:
    """
    Shared state of one worker process.

    ``slots`` are the live slots; ``running`` the jobs in flight by request id.
    Slot management (fixed count, or granted by a gate) is done by the owner
    through :meth:`add_slot`.
    """

    _log = Logger(namespace="pothead.worker")

    def __init__(
        self,
        reactor: Any,
        app: Any,
        targets: list[HubTarget],
        *,
        threads: int,
        keep_alive: bool = True,
        worker_token: bytes | None = None,
    ) -> None:
        self.reactor = reactor
        self.app = app
        self.targets = targets
        self.keep_alive = keep_alive
        #: Sent in a PTTH upgrade on every hub connection (None: no handshake).
        self.worker_token = worker_token
        self.threadpool = ThreadPool(minthreads=0, maxthreads=max(1, threads), name="pothead-wsgi")
        self.site = ReverseSite(self)
        self.slots: set[Slot] = set()
        self.running: dict[str, RunningJob] = {}
        self.totals: Counter[str] = Counter()
        self.stopping = False
        self._next_slot = 0
        self.observers: list[Callable[[str, dict[str, object]], None]] = []
        #: Parked and streaming responses (``--redirect-response``; None: off).
        self.redirects: Redirects | None = None

    def emit(self, event: str, **fields: object) -> None:
        self.totals[event] += 1
        for observer in self.observers:
            observer(event, fields)

    # -- slots ------------------------------------------------------------------

    def add_slot(self, grant: Any = None, *, gated: bool = False) -> Slot:
        self._next_slot += 1
        slot = Slot(self, self._next_slot, grant, gated=gated)
        slot.on_stopped = self._slot_stopped
        self.slots.add(slot)
        self._size_pool()
        slot.start()
        return slot

    def _slot_stopped(self, slot: Slot) -> None:
        self.slots.discard(slot)
        self._size_pool()
        self.emit("slot_stopped", slot=slot)

    def _size_pool(self) -> None:
        # One WSGI thread per slot: a slot runs at most one job.
        size = max(1, len(self.slots))
        if size != self.threadpool.max:
            self.threadpool.adjustPoolsize(0, size)

    @property
    def idle_connections(self) -> int:
        return sum(1 for slot in self.slots for link in slot.links.values() if link.idle)

    def connected_hubs(self) -> int:
        return sum(1 for target in self.targets if target.connections > 0)

    # -- jobs -------------------------------------------------------------------

    def job_started(self, slot: Slot, request: JobRequest, target: HubTarget) -> None:
        now = self.reactor.seconds()
        self.running[request.request_id] = RunningJob(request.request_id, now, target.description, slot.number)
        request.started_at = now  # type: ignore[attr-defined]
        self.emit("job_started", request_id=request.request_id)
        method = request.method.decode("latin-1")
        path = request.uri.decode("latin-1")
        # Formatted here (str.format is C; twisted.logger's formatter is pure
        # Python and was a measurable share of the worker's CPU per job).
        self._log.emit(
            LogLevel.info,
            "{log_text}",
            log_text=f"[{request.request_id}] job started: {method} {path} from hub {target.description} "
            f"(slot {slot.number})",
            request_id=request.request_id,
            method=method,
            path=path,
            hub=target.description,
            slot=slot.number,
        )

    def job_finished(self, slot: Slot, request: JobRequest, target: HubTarget, completed: bool) -> None:
        self.running.pop(request.request_id, None)
        duration = self.reactor.seconds() - getattr(request, "started_at", self.reactor.seconds())
        status = request.code if completed else None
        outcome = "done" if completed else "aborted (hub connection lost)"
        sent = request.sentLength
        parked = request.redirected
        if parked is not None:
            # The hub got a 303; what counts is what became of the parked body.
            sent = parked.bytes_sent
            status = {"sent": int(parked.status.split(" ", 1)[0]), "expired": 303}.get(parked.outcome or "")
            outcome = {
                "sent": "done via redirect",
                "expired": "ended: redirect never fetched (expired)",
                "failed": "failed while streaming its redirect",
            }.get(parked.outcome or "", "aborted (redirect consumer left)")
        self.emit("job_finished", status=status, duration=duration, completed=completed)
        method = request.method.decode("latin-1")
        path = request.uri.decode("latin-1")
        shown = status if status is not None else "-"
        self._log.emit(
            LogLevel.info,
            "{log_text}",
            log_text=f"[{request.request_id}] job {outcome}: {method} {path} {shown} {sent}B in {duration:.3f}s",
            request_id=request.request_id,
            outcome=outcome,
            method=method,
            path=path,
            status=shown,
            bytes=sent,
            duration=duration,
        )

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        self.threadpool.start()

    def stop(self) -> Deferred[Any]:
        """
        Close idle connections now; fires once every in-flight job has finished
        (with --redirect-response: once parked bodies were fetched and sent, or
        expired -- their slots stay busy until then).
        """
        self.stopping = True
        if self.redirects is not None:
            self.redirects.stop_parking()
        busy = sum(1 for slot in self.slots if slot.request is not None)
        self._log.info("worker stopping: closing idle connections, waiting for {busy} running jobs", busy=busy)
        return DeferredList([slot.stop() for slot in list(self.slots)])

    def stop_threads(self) -> None:
        if self.threadpool.started and not self.threadpool.joined:
            self.threadpool.stop()
