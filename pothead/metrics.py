"""
Prometheus metrics and health checks for both daemons.

Counters and histograms are module-level (one set per process, registered in
prometheus-client's default registry, where the app's own metrics live too);
they are fed by the ``observers`` hooks of :class:`~pothead.hub.dispatch.Hub`
and :class:`~pothead.worker.runtime.WorkerRuntime`.  Levels (queue length,
ready connections, busy slots...) are read from the live objects at scrape
time by a collector, so they can never drift from the truth.

Compatibility with the original POTHEAD: when ``PROMETHEUS_MULTIPROC_DIR``
names a directory, it is wiped at start-up (:mod:`pothead.promdir`, before
this module creates any metric) and the endpoint exports prometheus-client's
multiprocess view of it (plus our live levels); ``PROMETHEUS_PORT`` (default
9090) is then the metrics port unless ``--metrics`` says otherwise.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.resource import Resource


if TYPE_CHECKING:
    from twisted.web.server import Request

    from .hub.dispatch import Hub
    from .worker.runtime import WorkerRuntime

#: Job-sized buckets: these are expensive requests, from milliseconds to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))

# Metric families are created on first use, so a hub process exports only
# hub metrics and a worker only worker metrics (and, in multiprocess mode, only
# after the directory was wiped).


class _HubMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pothead_hub_requests_total",
            'Consumer requests by final HTTP status (code="none": the consumer left before a response).',
            ["code"],
        )
        self.rejections = Counter(
            "pothead_hub_rejections_total",
            "Requests the hub answered itself, by reason "
            "(queue_full, queue_timeout, body_too_large, bad_gateway, draining, bad_request, internal).",
            ["reason"],
        )
        self.queue_wait = Histogram(
            "pothead_hub_queue_wait_seconds",
            "Time from a request's arrival until a worker connection was assigned (or it left the queue).",
            buckets=BUCKETS,
        )
        self.job_duration = Histogram(
            "pothead_hub_job_duration_seconds",
            "Time from dispatch to a worker until the response's last byte, as seen by the hub.",
            buckets=BUCKETS,
        )
        self.worker_opened = Counter("pothead_hub_worker_connections_opened_total", "Worker connections accepted.")
        self.worker_closed = Counter("pothead_hub_worker_connections_closed_total", "Worker connections closed.")
        self.requeues = Counter(
            "pothead_hub_requeues_total",
            "Jobs put back at the head of the queue, by reason "
            "(not_delivered: the connection was stale or died before the request was written; "
            "worker_draining: the worker answered 503 + Pothead-Requeue).",
            ["reason"],
        )


class _WorkerMetrics:
    def __init__(self) -> None:
        self.jobs = Counter(
            "pothead_worker_jobs_total",
            'Jobs run by this worker, by HTTP status (code="aborted": the hub connection was lost mid-job).',
            ["code"],
        )
        self.job_duration = Histogram(
            "pothead_worker_job_duration_seconds", "Time from a job's request to its last byte sent.", buckets=BUCKETS
        )
        self.slots_granted = Counter("pothead_worker_slots_granted_total", "Slots granted by the app's wait_for_slot.")
        self.slot_wait = Histogram(
            "pothead_worker_slot_wait_seconds", "Time spent in the app's wait_for_slot per granted slot.", buckets=BUCKETS
        )
        self.connect_attempts = Counter(
            "pothead_worker_connection_attempts_total", "Connection attempts to a hub.", ["hub"]
        )
        self.connect_failures = Counter(
            "pothead_worker_connection_failures_total", "Failed connection attempts to a hub.", ["hub"]
        )
        self.redirects = Counter(
            "pothead_worker_redirects_total",
            "Responses parked for --redirect-response, by what became of them (parked, claimed, expired, refused).",
            ["event"],
        )


@functools.cache
def hub_metrics() -> _HubMetrics:
    return _HubMetrics()


@functools.cache
def worker_metrics() -> _WorkerMetrics:
    return _WorkerMetrics()


_hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()
_runtimes: "weakref.WeakSet[WorkerRuntime]" = weakref.WeakSet()


class _Levels(Collector):
    """Gauges read from the live hubs and workers of this process at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hubs = list(_hubs)
        if hubs:
            yield _gauge("pothead_hub_queue_length", "Requests waiting for a worker.", sum(h.queue.waiting for h in hubs))
            yield _gauge(
                "pothead_hub_queue_oldest_wait_seconds",
                "How long the oldest waiting request has waited.",
                max(h.queue.oldest_wait() for h in hubs),
            )
            yield _gauge(
                "pothead_hub_ready_connections", "Idle worker connections ready for a job.", sum(h.queue.ready for h in hubs)
            )
            yield _gauge(
                "pothead_hub_jobs_in_flight",
                "Requests dispatched to a worker and not finished.",
                sum(len(h.jobs) - h.queue.waiting for h in hubs),
            )
            yield _gauge("pothead_hub_worker_connections", "Open worker connections.", sum(len(h.connections) for h in hubs))
            yield _gauge("pothead_hub_draining", "1 while the hub drains for shutdown.", float(any(h.draining for h in hubs)))
        runtimes = list(_runtimes)
        if runtimes:
            yield _gauge("pothead_worker_slots", "Slots (concurrent job capacity) right now.", sum(len(r.slots) for r in runtimes))
            yield _gauge(
                "pothead_worker_busy_slots", "Slots running a job.", sum(len(r.running) for r in runtimes)
            )
            yield _gauge(
                "pothead_worker_threads", "Size of the WSGI thread pool.", sum(r.threadpool.max for r in runtimes)
            )
            yield _gauge(
                "pothead_worker_idle_connections", "Hub connections waiting for a job.", sum(r.idle_connections for r in runtimes)
            )
            yield _gauge("pothead_worker_connected_hubs", "Hubs with at least one open connection.", sum(r.connected_hubs() for r in runtimes))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


_LEVELS = _Levels()
REGISTRY.register(_LEVELS)


def observe_hub(hub: Hub) -> None:
    """Feed the hub's events into the hub metrics."""
    _hubs.add(hub)
    m = hub_metrics()

    def observe(event: str, fields: dict[str, Any]) -> None:
        if event == "request":
            status = fields.get("status")
            m.requests.labels(code=str(status) if status is not None else "none").inc()
            m.queue_wait.observe(float(fields.get("queue_wait") or 0.0))
            if fields.get("dispatched"):
                m.job_duration.observe(float(fields.get("job_time") or 0.0))
        elif event == "rejected":
            m.rejections.labels(reason=str(fields.get("reason"))).inc()
        elif event == "requeue":
            m.requeues.labels(reason=str(fields.get("reason"))).inc()
        elif event == "worker_connected":
            m.worker_opened.inc()
        elif event == "worker_disconnected":
            m.worker_closed.inc()

    hub.observers.append(observe)


def observe_worker(runtime: WorkerRuntime) -> None:
    """Feed the worker's events into the worker metrics."""
    _runtimes.add(runtime)
    m = worker_metrics()

    def observe(event: str, fields: dict[str, Any]) -> None:
        if event == "job_finished":
            status = fields.get("status")
            m.jobs.labels(code=str(status) if fields.get("completed") and status else "aborted").inc()
            m.job_duration.observe(float(fields.get("duration") or 0.0))
        elif event == "connect_attempt":
            m.connect_attempts.labels(hub=str(fields.get("hub"))).inc()
        elif event == "connect_failed":
            m.connect_failures.labels(hub=str(fields.get("hub"))).inc()
        elif event == "slot_granted":
            m.slots_granted.inc()
            m.slot_wait.observe(float(fields.get("waited") or 0.0))
        elif event.startswith("redirect_"):
            m.redirects.labels(event=event[len("redirect_"):]).inc()

    runtime.observers.append(observe)


# -- the endpoint ------------------------------------------------------------


def export_registry(multiprocess_dir: str | None) -> CollectorRegistry:
    """What ``/metrics`` shows: the default registry, or the multiprocess view plus live levels."""
    if multiprocess_dir is None:
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiprocess_dir)
    registry.register(_LEVELS)
    return registry


class _Text(Resource):
    isLeaf = True

    def __init__(self, render_fn: Callable[[Request], tuple[int, bytes, bytes]]) -> None:
        super().__init__()
        self._render_fn = render_fn

    def render_GET(self, request: Request) -> bytes:
        code, content_type, body = self._render_fn(request)
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def operator_resource(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> Resource:
    """``/metrics``, ``/healthz`` (alive) and ``/readyz`` (ready for traffic) for the operator port."""
    root = Resource()

    def metrics(request: Request) -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(registry)

    def healthz(request: Request) -> tuple[int, bytes, bytes]:
        return 200, b"text/plain; charset=utf-8", b"ok\n"

    def readyz(request: Request) -> tuple[int, bytes, bytes]:
        ok, why = ready()
        return (200 if ok else 503), b"text/plain; charset=utf-8", (why + "\n").encode()

    root.putChild(b"metrics", _Text(metrics))
    root.putChild(b"healthz", _Text(healthz))
    root.putChild(b"readyz", _Text(readyz))
    return root
