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
9090) is then the metrics port unless ``--metrics`` says otherwise (every
interface, like the original, unless ``PROMETHEUS_ADDR`` names one).

Naming follows the Prometheus conventions: ``pothead_hub_*`` and
``pothead_worker_*``, base units (``_seconds``), ``_total`` on counters, help
text on every family.  Labels are bounded: ``code`` (an HTTP status, or
``none``/``other``/``aborted``), ``reason`` (a fixed list, anything else is
``other``) and ``hub`` (the worker's ``--connect`` addresses); never a request
id, path, client or worker port.  Levels are process-wide sums: a process
running several hubs (tests) reports their total on each endpoint.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Site


if TYPE_CHECKING:
    from twisted.web import http
    from twisted.web.server import Request

    from .hub.dispatch import Hub
    from .worker.runtime import WorkerRuntime

#: Job-sized buckets: these are expensive requests, from milliseconds to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))

#: Label values of the hub's ``reason`` labels.  Anything else is reported as
#: ``other``, so a new code path can never grow a label without bound.
REJECTION_REASONS = (
    "queue_full",
    "queue_timeout",
    "body_too_large",
    "headers_too_large",
    "uri_too_long",
    "bad_request",
    "bad_gateway",
    "draining",
    "internal",
)
REQUEUE_REASONS = ("not_delivered", "worker_draining")
ABORT_REASONS = ("worker_failed", "consumer_gone", "drain_timeout")

# Metric families are created on first use, so a hub process exports only
# hub metrics and a worker only worker metrics (and, in multiprocess mode, only
# after the directory was wiped).


class _HubMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pothead_hub_requests_total",
            "Consumer requests by the final HTTP status sent (the worker's or the hub's own); "
            'code="none": the consumer left before a status was sent.',
            ["code"],
        )
        self.aborted = Counter(
            "pothead_hub_responses_aborted_total",
            "Responses cut off after their status was chosen, by reason "
            "(worker_failed: the worker died mid-body; consumer_gone; drain_timeout).",
            ["reason"],
        )
        self.rejections = Counter(
            "pothead_hub_rejections_total",
            "Requests the hub answered itself with an error, by reason (" + ", ".join(REJECTION_REASONS) + ").",
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
        # Every known label value exists from the start (at 0), so rate() and
        # increase() see the first event instead of a series appearing at 1.
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for reason in REQUEUE_REASONS:
            self.requeues.labels(reason=reason)
        for reason in ABORT_REASONS:
            self.aborted.labels(reason=reason)


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
            "pothead_worker_connection_attempts_total",
            "Connection attempts to a hub (hub: the --connect address, as an endpoint string).",
            ["hub"],
        )
        self.connect_failures = Counter(
            "pothead_worker_connection_failures_total",
            "Connection attempts to a hub that failed (refused, unreachable, timed out).",
            ["hub"],
        )
        # Separate counters, not one with an "event" label: parked = claimed +
        # expired + still parked, so a sum over such a label would mean nothing.
        self.redirects_parked = Counter(
            "pothead_worker_redirects_parked_total",
            "200 responses parked under a single-use key for --redirect-response (the hub got a 303).",
        )
        self.redirects_claimed = Counter(
            "pothead_worker_redirects_claimed_total", "Parked responses fetched by the consumer."
        )
        self.redirects_expired = Counter(
            "pothead_worker_redirects_expired_total", "Parked responses dropped unclaimed when their key expired."
        )
        self.redirects_refused = Counter(
            "pothead_worker_redirects_refused_total",
            "Fetches of an unknown, already used or expired redirect key (answered 410 Gone).",
        )


@functools.cache
def hub_metrics() -> _HubMetrics:
    return _HubMetrics()


@functools.cache
def worker_metrics() -> _WorkerMetrics:
    return _WorkerMetrics()


_hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()
_runtimes: "weakref.WeakSet[WorkerRuntime]" = weakref.WeakSet()


def _live_hubs() -> list[Hub]:
    # A hub whose drain is over (draining_workers) has stopped: it must not
    # keep reporting draining=1 or stale levels until it is garbage-collected.
    return [h for h in list(_hubs) if not h.draining_workers]


def _live_runtimes() -> list[WorkerRuntime]:
    return [r for r in list(_runtimes) if not r.threadpool.joined]


class _Levels(Collector):
    """Gauges read from the live hubs and workers of this process at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if _hubs:
            hubs = _live_hubs()
            yield _gauge("pothead_hub_queue_length", "Requests waiting for a worker.", sum(h.queue.waiting for h in hubs))
            yield _gauge(
                "pothead_hub_queue_oldest_wait_seconds",
                "How long the oldest waiting request has waited (0 with an empty queue).",
                max((h.queue.oldest_wait() for h in hubs), default=0.0),
            )
            yield _gauge(
                "pothead_hub_ready_connections",
                "Idle worker connections ready for a job.",
                sum(h.queue.ready for h in hubs),
            )
            yield _gauge(
                "pothead_hub_jobs_in_flight",
                "Requests dispatched to a worker whose response has not ended.",
                sum(max(0, len(h.jobs) - h.queue.waiting) for h in hubs),
            )
            yield _gauge(
                "pothead_hub_worker_connections",
                "Open worker connections (ready, busy or being closed).",
                sum(len(h.connections) for h in hubs),
            )
            yield _gauge(
                "pothead_hub_draining", "1 while the hub drains for shutdown, else 0.", float(any(h.draining for h in hubs))
            )
        if _runtimes:
            runtimes = _live_runtimes()
            yield _gauge(
                "pothead_worker_slots",
                "Slots: jobs this worker can run at once right now (fixed by --threads, or granted by the gate).",
                sum(len(r.slots) for r in runtimes),
            )
            yield _gauge("pothead_worker_busy_slots", "Slots running a job.", sum(len(r.running) for r in runtimes))
            yield _gauge(
                "pothead_worker_threads",
                "Size of the WSGI thread pool (follows the number of slots).",
                sum(r.threadpool.max for r in runtimes),
            )
            yield _gauge(
                "pothead_worker_idle_connections",
                "Hub connections waiting for a job.",
                sum(r.idle_connections for r in runtimes),
            )
            yield _gauge(
                "pothead_worker_connected_hubs",
                "Hubs with at least one open connection from this worker.",
                sum(r.connected_hubs() for r in runtimes),
            )
            yield _gauge(
                "pothead_worker_draining", "1 while the worker drains for shutdown, else 0.", float(any(r.stopping for r in runtimes))
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


_LEVELS = _Levels()
REGISTRY.register(_LEVELS)


def status_label(status: object) -> str:
    """A bounded ``code`` label: the HTTP status, ``other`` for nonsense, ``none`` for no status."""
    if status is None:
        return "none"
    try:
        code = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "other"
    return str(code) if 100 <= code <= 599 else "other"


def _bounded(value: object, known: tuple[str, ...]) -> str:
    text = str(value)
    return text if text in known else "other"


#: Outcomes of a hub request whose response was cut off after its status was chosen.
_ABORTED = {"truncated": "worker_failed", "consumer_gone": "consumer_gone", "drain_timeout": "drain_timeout"}


def observe_hub(hub: Hub) -> None:
    """Feed the hub's events into the hub metrics."""
    _hubs.add(hub)
    m = hub_metrics()

    def observe(event: str, fields: dict[str, Any]) -> None:
        if event == "request":
            status = fields.get("status")
            m.requests.labels(code=status_label(status)).inc()
            m.queue_wait.observe(float(fields.get("queue_wait") or 0.0))
            if fields.get("dispatched"):
                m.job_duration.observe(float(fields.get("job_time") or 0.0))
            aborted = _ABORTED.get(str(fields.get("outcome")))
            if aborted is not None and status is not None:
                m.aborted.labels(reason=aborted).inc()
        elif event == "rejected":
            m.rejections.labels(reason=_bounded(fields.get("reason"), REJECTION_REASONS)).inc()
            if fields.get("job") is False:
                # Refused by the HTTP layer before a job existed (413, 414,
                # 431): no "request" event follows, so count the status here.
                m.requests.labels(code=status_label(fields.get("status"))).inc()
        elif event == "requeue":
            m.requeues.labels(reason=_bounded(fields.get("reason"), REQUEUE_REASONS)).inc()
        elif event == "worker_connected":
            m.worker_opened.inc()
        elif event == "worker_disconnected":
            m.worker_closed.inc()

    hub.observers.append(observe)


def observe_worker(runtime: WorkerRuntime) -> None:
    """Feed the worker's events into the worker metrics."""
    _runtimes.add(runtime)
    m = worker_metrics()
    redirects = {
        "redirect_parked": m.redirects_parked,
        "redirect_claimed": m.redirects_claimed,
        "redirect_expired": m.redirects_expired,
        "redirect_refused": m.redirects_refused,
    }

    for target in runtime.targets:  # every hub's series exists from the start, at 0
        m.connect_attempts.labels(hub=target.description)
        m.connect_failures.labels(hub=target.description)

    def observe(event: str, fields: dict[str, Any]) -> None:
        if event == "job_finished":
            status = fields.get("status")
            m.jobs.labels(code=status_label(status) if fields.get("completed") and status else "aborted").inc()
            m.job_duration.observe(float(fields.get("duration") or 0.0))
        elif event == "connect_attempt":
            m.connect_attempts.labels(hub=str(fields.get("hub"))).inc()
        elif event == "connect_failed":
            m.connect_failures.labels(hub=str(fields.get("hub"))).inc()
        elif event == "slot_granted":
            m.slots_granted.inc()
            m.slot_wait.observe(float(fields.get("waited") or 0.0))
        elif event in redirects:
            redirects[event].inc()

    runtime.observers.append(observe)


def forget_hub(hub: Hub) -> None:
    """Stop reporting ``hub``'s levels (its service stopped)."""
    _hubs.discard(hub)


def forget_worker(runtime: WorkerRuntime) -> None:
    """Stop reporting ``runtime``'s levels (its service stopped)."""
    _runtimes.discard(runtime)


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


class _QuietSite(Site):
    """The operator port's Site: no access line per scrape, no start/stop chatter."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def operator_site(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> Site:
    """A Site serving :func:`operator_resource`, quiet (a scrape every 15 s is not news)."""
    return _QuietSite(operator_resource(registry, ready))
