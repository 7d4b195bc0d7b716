"""
Command-line options of ``twistd pothead-hub`` and ``twistd pothead-worker``,
parsed into the typed configs of :mod:`pothead.config`.

``twisted/plugins/pothead_plugins.py`` only names these; keeping the code here
keeps twistd's plugin scan cheap.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, HubConfig, WorkerConfig, parse_count, parse_seconds, parse_size, parse_url_base


def _fail(error: ConfigError) -> usage.UsageError:
    return usage.UsageError(str(error))


class _OneLineErrors(usage.Options):
    """Bad options end the process with one line on stderr, not twistd's usage page."""

    command = "pothead"

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"{self.command}: {e} (see: twistd {self.command} --help)") from None


class HubOptions(_OneLineErrors):
    command = "pothead-hub"
    synopsis = "[options]"
    longdesc = (
        "Run a pothead hub: consumers send HTTP requests to --listen; workers dial in to --workers and "
        "each idle worker connection takes the oldest queued request.  Addresses are Twisted server "
        "endpoint strings (tcp:8080, tcp:port=8080:interface=127.0.0.1, ssl:..., unix:..., "
        "systemd:domain=INET:index=0); --listen and --workers may be given several times."
    )
    optParameters = [
        ["queue-timeout", None, "0", "Seconds a request may wait for a worker before 503 + Retry-After (0: wait forever)."],
        ["max-queue", None, "0", "Queued requests beyond which new ones get 503 at once (0: unbounded)."],
        ["max-body", None, "1G", "Largest request body accepted; larger gets 413 (bytes, or 64k, 10M, 1G)."],
        ["max-header-size", None, "16k", "Largest request line plus headers; larger gets 431 (bytes or suffix)."],
        ["drain-timeout", None, "30", "On SIGTERM, seconds to let queued and running jobs finish before giving up."],
        ["consumer-timeout", None, "60", "Seconds before an idle consumer connection is closed (0: never)."],
        ["worker-stall-timeout", None, "300", "Seconds a worker may send nothing in the middle of a response body "
         "(while the consumer reads) before that response is aborted (0: no limit)."],
        ["header-timeout", None, "10", "Seconds from a request's first byte until its head is complete; slower gets 408 (0: no limit)."],
        ["max-connections", None, "10000", "Open consumer connections beyond which new ones get 503 and a close (0: no cap)."],
        ["retry-after", None, "5", "Seconds advertised in Retry-After on 503 responses."],
        ["metrics", None, None, "Endpoint for /metrics, /healthz and /readyz, e.g. tcp:9090:interface=127.0.0.1 "
         "(default: none; with $PROMETHEUS_MULTIPROC_DIR set, tcp:$PROMETHEUS_PORT or tcp:9090)."],
        ["log-format", None, "text", "text (twistd's lines) or json (one JSON object per line)."],
        ["worker-token-file", None, None, "File holding a shared secret: workers must present it in a PTTH upgrade "
         "(Authorization: Bearer) before they get any job; others get 401 and a close."],
        ["admin", None, None, "Endpoint for operators: GET /status (queue, ready connections, jobs in flight per "
         "worker) as text or JSON, e.g. tcp:9080:interface=127.0.0.1 (default: none)."],
    ]

    optFlags = [
        [
            "trust-forwarded",
            None,
            "Keep X-Forwarded-Proto/-Host set by a proxy in front of the hub (default: replace them with the hub's view).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["workers"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint for consumers (repeatable) [default: tcp:8080]."""
        self["listen"].append(description)

    def opt_workers(self, description: str) -> None:
        """Endpoint for workers to connect to (repeatable) [default: tcp:4040]."""
        self["workers"].append(description)

    def postOptions(self) -> None:
        try:
            max_queue = parse_count(self["max-queue"], "--max-queue")
            self.config = HubConfig(
                listen=tuple(self["listen"]) or ("tcp:8080",),
                workers=tuple(self["workers"]) or ("tcp:4040",),
                queue_timeout=parse_seconds(self["queue-timeout"], "--queue-timeout"),
                max_queue=max_queue or None,
                max_body=parse_size(self["max-body"], "--max-body"),
                max_header_bytes=max(1024, parse_size(self["max-header-size"], "--max-header-size")),
                drain_timeout=parse_seconds(self["drain-timeout"], "--drain-timeout") or 0.0,
                consumer_idle_timeout=parse_seconds(self["consumer-timeout"], "--consumer-timeout"),
                header_timeout=parse_seconds(self["header-timeout"], "--header-timeout"),
                worker_stall_timeout=parse_seconds(self["worker-stall-timeout"], "--worker-stall-timeout"),
                max_connections=parse_count(self["max-connections"], "--max-connections") or None,
                retry_after=parse_count(self["retry-after"], "--retry-after") or 0,
                trust_forwarded=bool(self["trust-forwarded"]),
                metrics=self["metrics"],
                worker_token=_token(self["worker-token-file"]),
                admin=self["admin"],
            )
            _check_log_format(self["log-format"])
        except ConfigError as e:
            raise _fail(e) from None


class WorkerOptions(_OneLineErrors):
    command = "pothead-worker"
    synopsis = "[options] MODULE:APP"
    longdesc = (
        "Run a pothead worker: open connections OUT to one or more hubs and serve the WSGI app MODULE:APP "
        "(default pothead.demo:app) on them, one job per connection at a time.  --connect takes HOST:PORT "
        "or a Twisted client endpoint string (tcp:host=hub:port=4040, ssl:..., unix:path=...) and may be "
        "given several times: every idle slot waits on every hub."
    )
    optParameters = [
        ["threads", "t", "1", "Concurrent jobs: connections held open per hub and WSGI threads."],
        ["drain-timeout", None, "0", "On SIGTERM, seconds to let running jobs finish before cutting them off (0: wait)."],
        ["reconnect-max", None, "10", "Longest wait between attempts while a hub is unreachable (seconds)."],
        ["metrics", None, None, "Endpoint for /metrics, /healthz and /readyz, e.g. tcp:9091:interface=127.0.0.1 "
         "(default: none; with $PROMETHEUS_MULTIPROC_DIR set, tcp:$PROMETHEUS_PORT or tcp:9090)."],
        ["log-format", None, "text", "text (twistd's lines) or json (one JSON object per line)."],
        ["worker-token-file", None, None, "File holding the hubs' worker token, sent in a PTTH upgrade on every connection."],
        ["tls-ca", None, None, "Connect to the hubs with TLS, verifying their certificate (and host name) against this CA file (PEM)."],
        ["tls-cert", None, None, "Client certificate (PEM) to present to the hubs, with --tls-ca."],
        ["tls-key", None, None, "Private key (PEM) of --tls-cert, if not in the same file."],
        ["redirect-response", None, None, "Endpoint of a listener for redirected responses, e.g. tcp:8081: a 200 "
         "response is parked and the hub gets 303 See Other to <base>/<single-use key>; the consumer fetches "
         "the body from here (default: none, responses go through the hub)."],
        ["redirect-url-base", None, None, "URL put before the key in Location, e.g. https://media.example.com "
         "(default: http://<this worker's address towards the hub>:<redirect port>)."],
        ["redirect-expiry", None, "20", "Seconds a parked response waits to be fetched before it is closed (410 after)."],
        ["inspect", None, None, "Endpoint for operators: GET /inspect (jobs in flight, parked redirects) and "
         "GET /apocalypse (streams until the worker has stopped), e.g. tcp:9081:interface=127.0.0.1 (default: none)."],
    ]
    optFlags = [
        ["no-keep-alive", None, "Close the hub connection after every job (like the reference worker)."],
        [
            "poll-jobs",
            None,
            "Take jobs as the app's wait_for_slot(halt) grants slots (e.g. pothead.gating.wait_for_idle_cpus); "
            "the thread pool follows the number of slots.  Excludes --threads.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["connect"] = []
        self["app"] = "pothead.demo:app"

    def opt_connect(self, description: str) -> None:
        """Hub to connect to, HOST:PORT or endpoint (repeatable) [default: localhost:4040]."""
        self["connect"].append(description)

    def parseArgs(self, app: str | None = None) -> None:  # type: ignore[override]
        if app is not None:
            self["app"] = app

    def postOptions(self) -> None:
        try:
            threads = parse_count(self["threads"], "--threads", minimum=1) or 1
            if self["poll-jobs"] and self["threads"] != "1":
                raise ConfigError("--poll-jobs and --threads exclude each other: the gate decides how many jobs run")
            self.config = WorkerConfig(
                poll_jobs=bool(self["poll-jobs"]),
                connect=tuple(self["connect"]) or ("localhost:4040",),
                app=self["app"],
                threads=threads,
                keep_alive=not self["no-keep-alive"],
                drain_timeout=parse_seconds(self["drain-timeout"], "--drain-timeout"),
                reconnect_max=parse_seconds(self["reconnect-max"], "--reconnect-max", allow_zero=False) or 10.0,
                metrics=self["metrics"],
                worker_token=_token(self["worker-token-file"]),
                redirect=self["redirect-response"],
                redirect_url_base=(
                    parse_url_base(self["redirect-url-base"], "--redirect-url-base")
                    if self["redirect-url-base"] is not None
                    else None
                ),
                redirect_expiry=_expiry(self["redirect-expiry"]),
                inspect=self["inspect"],
            )
            if self["redirect-url-base"] is not None and self["redirect-response"] is None:
                raise ConfigError("--redirect-url-base needs --redirect-response")
            _check_log_format(self["log-format"])
        except ConfigError as e:
            raise _fail(e) from None


def _expiry(text: str) -> float:
    value = parse_seconds(text, "--redirect-expiry", allow_zero=False)
    if value is None:
        raise ConfigError(f"--redirect-expiry: {text!r} must be a number of seconds > 0 (parked responses hold a slot)")
    return value


def _token(path: str | None) -> bytes | None:
    if path is None:
        return None
    from twisted.logger import Logger

    from .ptth import read_token_file

    token, warning = read_token_file(path, "--worker-token-file")
    if warning is not None:
        Logger(namespace="pothead").warn("{warning}", warning=warning)
    return token


def _check_log_format(value: str) -> None:
    if value not in ("text", "json"):
        raise ConfigError(f"--log-format: {value!r} is not text or json")


def _with_metrics(config: Any) -> Any:
    """Resolve --metrics / PROMETHEUS_* (wiping the multiprocess directory) before any metric exists."""
    from dataclasses import replace

    from .promdir import metrics_endpoint

    endpoint, directory = metrics_endpoint(config.metrics)
    return replace(config, metrics=endpoint, multiprocess_dir=directory)


def _exit_zero_after_stop_signal(reactor: Any) -> None:
    """
    twistd re-raises SIGTERM/SIGINT on itself once the reactor stopped, so the
    process "dies of SIGTERM" (status -15 / 143) even after a complete drain.
    A drained stop is a clean exit: clear the recorded signal (a private
    attribute of Twisted's reactor; without it this does nothing).
    """
    import signal

    def clear() -> None:
        if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            reactor._exitSignal = None

    reactor.addSystemEventTrigger("after", "shutdown", clear)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def make_hub_service(options: HubOptions) -> IService:
    """The hub, with a systemd notifier (READY/STOPPING/STATUS/WATCHDOG) when $NOTIFY_SOCKET is set."""
    from .logs import observer_for
    from .sdnotify import attach_notifier

    try:
        config = _with_metrics(options.config)
        from .hub.service import HubService

        service = HubService(config, _reactor())
        service.log_observer = observer_for(options["log-format"])
        attach_notifier(service, _reactor())
        _exit_zero_after_stop_signal(_reactor())
        return service
    except ConfigError as e:
        raise SystemExit(f"pothead-hub: {e}") from None


def make_worker_service(options: WorkerOptions) -> IService:
    """The worker, with a systemd notifier (READY/STOPPING/STATUS/WATCHDOG) when $NOTIFY_SOCKET is set."""
    from .logs import observer_for
    from .sdnotify import attach_notifier

    try:
        config = _with_metrics(options.config)
        from .worker.service import WorkerService
        from .worker.wsgi import load_app

        app = load_app(config.app)
        service = WorkerService(config, app, _reactor())
        service.log_observer = observer_for(options["log-format"])
        attach_notifier(service, _reactor())
        _exit_zero_after_stop_signal(_reactor())
        return service
    except ConfigError as e:
        raise SystemExit(f"pothead-worker: {e}") from None


__all__ = ["HubOptions", "WorkerOptions", "make_hub_service", "make_worker_service"]
