"""
``--admin ENDPOINT``: the hub's view for operators.

``GET /status`` -- queue length and oldest wait, worker connections ready for
a job, jobs in flight in total and per worker address, and event totals; plain
text, or JSON with ``Accept: application/json`` (or ``?format=json``).

The listener is separate from consumer traffic and meant for operators only:
bind it to loopback or a management network.  Each response closes its
connection, so a monitoring loop leaves nothing idle behind.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..operator import close_after, respond
from .dispatch import Hub


def hub_status(hub: Hub) -> dict[str, Any]:
    waiting = hub.queue.waiting
    return {
        "state": "draining" if hub.draining else "running",
        "queue_length": waiting,
        "oldest_wait": round(hub.queue.oldest_wait(), 3),
        "ready_connections": hub.queue.ready,
        "worker_connections": len(hub.connections),
        "in_flight": max(0, len(hub.jobs) - waiting),
        "in_flight_by_worker": dict(sorted(hub.in_flight_by_worker().items())),
        "totals": dict(sorted(hub.totals.items())),
    }


def hub_status_text(status: dict[str, Any]) -> str:
    lines = [
        f"pothead hub: {status['state']}",
        f"queue: {status['queue_length']} waiting, oldest for {status['oldest_wait']:.1f}s",
        f"worker connections: {status['worker_connections']} open, {status['ready_connections']} ready for a job",
        f"jobs in flight: {status['in_flight']}",
    ]
    for worker, count in status["in_flight_by_worker"].items():
        lines.append(f"  {worker}  {count}")
    totals = " ".join(f"{name}={count}" for name, count in status["totals"].items())
    lines.append(f"totals: {totals or '-'}")
    return "\n".join(lines) + "\n"


class StatusResource(Resource):
    isLeaf = True

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self._hub = hub

    def render_GET(self, request: Request) -> bytes:
        status = hub_status(self._hub)
        return respond(request, status, hub_status_text(status))


class _Index(Resource):
    def render_GET(self, request: Request) -> bytes:
        close_after(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"pothead hub admin: GET /status (text, or JSON with Accept: application/json)\n"


class AdminSite(Site):
    """No access log: a monitoring loop polling /status must not fill the hub's log."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


def admin_site(hub: Hub) -> Site:
    root = _Index()
    root.putChild(b"status", StatusResource(hub))
    root.putChild(b"", root)
    return AdminSite(root, timeout=30)
