"""
``--inspect ENDPOINT``: the worker's view for operators.

* ``GET /inspect`` -- the requests in flight (request id, age, what they are
  doing), parked redirects with their time to expiry, redirects streaming,
  how many hub connections wait for a job, and event totals.  Plain text, or
  JSON when the request says ``Accept: application/json`` (or ``?format=json``).
* ``GET /apocalypse`` (the original POTHEAD's name) -- a line now and one every
  5 s while the worker runs or drains, then ``It's time`` and the end of the
  response once the worker has fully stopped.  A deploy script sends SIGTERM
  and reads this to the end to wait for the drain.

The listener is separate from consumer traffic and meant for operators only:
bind it to loopback or a management network.  Redirect keys are never shown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..operator import close_after, respond
from .redirect import ClosingChannel, ClosingSite

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

_log = Logger(namespace="pothead.worker")

#: Seconds between two lines of /apocalypse.
APOCALYPSE_INTERVAL = 5.0


class Inspection:
    """What ``/inspect`` and ``/apocalypse`` report, and their resource tree."""

    def __init__(self, runtime: WorkerRuntime, interval: float = APOCALYPSE_INTERVAL) -> None:
        self.runtime = runtime
        self.interval = interval
        #: True once the worker has fully stopped (the last thing before its listeners close).
        self.stopped = False
        self._watchers: set[_Watcher] = set()
        root = _Index()
        root.putChild(b"inspect", _InspectResource(self))
        root.putChild(b"apocalypse", _ApocalypseResource(self))
        root.putChild(b"", root)
        self.site = ClosingSite(root)

    # -- the view -----------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        return "stopping" if self.runtime.stopping else "running"

    def status(self) -> dict[str, Any]:
        runtime = self.runtime
        now = runtime.reactor.seconds()
        redirects = runtime.redirects
        in_flight = []
        for job in sorted(runtime.running.values(), key=lambda job: job.started):
            phase = redirects.phase_of(job.request_id) if redirects is not None else None
            in_flight.append(
                {
                    "request_id": job.request_id,
                    "age": round(now - job.started, 3),
                    "phase": phase or "running",
                    "slot": job.slot,
                    "hub": job.hub,
                }
            )
        return {
            "state": self.state,
            "slots": len(runtime.slots),
            "busy_slots": sum(1 for slot in runtime.slots if slot.request is not None),
            "threads": runtime.threadpool.max,
            "waiting_for_job": runtime.idle_connections,
            "hubs": {target.description: target.connections for target in runtime.targets},
            "in_flight": in_flight,
            "redirects": redirects.describe() if redirects is not None else None,
            "totals": dict(sorted(runtime.totals.items())),
        }

    def text(self, status: dict[str, Any]) -> str:
        lines = [
            f"pothead worker: {status['state']}",
            f"slots: {status['slots']} ({status['busy_slots']} busy), WSGI threads: {status['threads']}",
            f"connections waiting for a job: {status['waiting_for_job']}",
        ]
        for hub, connections in status["hubs"].items():
            lines.append(f"hub {hub}: {connections} connections open")
        lines.append(f"requests in flight: {len(status['in_flight'])}")
        for job in status["in_flight"]:
            lines.append(f"  {job['request_id']}  {job['age']:.1f}s  {job['phase']}  (slot {job['slot']}, hub {job['hub']})")
        redirects = status["redirects"]
        if redirects is None:
            lines.append("redirects: off")
        else:
            lines.append(f"redirects parked: {len(redirects['parked'])}")
            for parked in redirects["parked"]:
                lines.append(f"  {parked['request_id']}  expires in {parked['expires_in']:.1f}s")
            lines.append(f"redirects streaming: {len(redirects['streaming'])}")
            for streaming in redirects["streaming"]:
                lines.append(f"  {streaming['request_id']}  {streaming['bytes_sent']} bytes sent in {streaming['age']:.1f}s")
        totals = " ".join(f"{name}={count}" for name, count in status["totals"].items())
        lines.append(f"totals: {totals or '-'}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One line for /apocalypse."""
        runtime = self.runtime
        parts = [self.state, f"{len(runtime.running)} jobs in flight"]
        if runtime.redirects is not None:
            parts.append(f"{len(runtime.redirects.parked)} redirects parked")
        parts.append(f"{runtime.idle_connections} connections waiting for a job")
        return ", ".join(parts)

    # -- /apocalypse ----------------------------------------------------------------

    def watch(self, request: Request) -> None:
        watcher = _Watcher(self, request)
        self._watchers.add(watcher)
        watcher.start()

    def forget(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)

    def worker_stopped(self, timeout: float = 2.0) -> Deferred[Any]:
        """
        The worker has fully stopped: every /apocalypse gets its last line and
        its end.  Fires once those connections closed (at most ``timeout`` s).
        """
        self.stopped = True
        closing = [watcher.end() for watcher in list(self._watchers)]
        if not closing:
            return succeed(None)
        done = DeferredList(closing, consumeErrors=True)
        done.addTimeout(timeout, self.runtime.reactor)
        done.addErrback(lambda _: None)
        return done

    def close_connections(self) -> None:
        self.site.close_connections()


class _Watcher:
    """One ``/apocalypse`` response."""

    def __init__(self, inspection: Inspection, request: Request) -> None:
        self.inspection = inspection
        self.request = request
        self._loop = LoopingCall(self._tick)
        self._loop.clock = inspection.runtime.reactor
        self._gone = False
        request.notifyFinish().addBoth(self._finished)

    def start(self) -> None:
        if self.inspection.stopped:
            self.end()
            return
        self._loop.start(self.inspection.interval, now=True)

    def _tick(self) -> None:
        if not self._gone:
            self.request.write(f"Not yet: {self.inspection.summary()}\n".encode())

    def end(self) -> Deferred[None]:
        """Write the last line and finish; fires once the connection is closed."""
        if self._loop.running:
            self._loop.stop()
        if self._gone:
            return succeed(None)
        self._gone = True
        channel = self.request.channel
        # The connection closes after the response (Connection: close); wait
        # for that, so the last line is out before the process exits.
        closed = channel.when_closed() if isinstance(channel, ClosingChannel) else succeed(None)
        self.request.write(b"It's time\n")
        self.request.finish()
        return closed

    def _finished(self, result: object) -> None:
        if self._loop.running:
            self._loop.stop()
        self._gone = True
        self.inspection.forget(self)


class _Index(Resource):
    def render_GET(self, request: Request) -> bytes:
        close_after(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"pothead worker inspection: GET /inspect (text, or JSON with Accept: application/json), GET /apocalypse\n"


class _InspectResource(Resource):
    isLeaf = True

    def __init__(self, inspection: Inspection) -> None:
        super().__init__()
        self._inspection = inspection

    def render_GET(self, request: Request) -> bytes:
        status = self._inspection.status()
        return respond(request, status, self._inspection.text(status))


class _ApocalypseResource(Resource):
    isLeaf = True

    def __init__(self, inspection: Inspection) -> None:
        super().__init__()
        self._inspection = inspection

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        close_after(request)
        self._inspection.watch(request)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        close_after(request)
        return b""
