"""
``python3 -m pothead.worker [--connect host:port] [--workers N | --poll-jobs]
[--redirect-response PORT] [--inspection-port PORT] [--use-request-subprocess]
[module:app]``: the reference POTHEAD worker's command line, running our worker.

Options keep the reference meaning.  One that our worker does not support
stops the worker with a one-line message rather than being ignored.
``--redirect-response`` and ``--inspection-port`` take a port (every
interface, as the reference binds) or a Twisted endpoint string.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..config import ConfigError, WorkerConfig

DEFAULT_APP = "pothead.worker:demo_app"

#: Options accepted for compatibility whose feature is not built yet.
UNSUPPORTED = {
    "use_request_subprocess": "--use-request-subprocess is not supported by pothead's worker; "
    "run the app in its own process with twistd pothead-worker instead",
}


def _default_workers() -> int:
    text = os.environ.get("POTHEAD_WORKERS", "1")
    try:
        return max(1, int(text))
    except ValueError:
        raise SystemExit(f"pothead.worker: POTHEAD_WORKERS={text!r} is not a whole number") from None


def _listen_description(value: str | None, option: str) -> str | None:
    """A port number (the reference's form: every interface) -> ``tcp:PORT``; endpoint strings unchanged."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        if not 0 <= int(text) <= 65535:
            raise ConfigError(f"{option}: {text} is not a port number")
        return f"tcp:{int(text)}"
    if ":" not in text:
        raise ConfigError(f"{option}: {value!r} is not a port number or an endpoint like tcp:8081:interface=127.0.0.1")
    return text


def _expiry_from_environment() -> float:
    """The reference worker reads the redirect expiry from $OOB_ITEM_EXPIRY_SECONDS."""
    text = os.environ.get("OOB_ITEM_EXPIRY_SECONDS", "20")
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"OOB_ITEM_EXPIRY_SECONDS={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"OOB_ITEM_EXPIRY_SECONDS must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_workers = _default_workers()
    parser = argparse.ArgumentParser(
        prog="python3 -m pothead.worker",
        description="Run a WSGI app as a pothead worker (reference-compatible command line; "
        "see `twistd pothead-worker --help` for more).",
    )
    parser.add_argument("--connect", default="localhost:4040", help="Hub to connect to [host:port] (default: localhost:4040)")
    parser.add_argument(
        "--redirect-response",
        default=None,
        metavar="PORT",
        help="Redirect successful responses to this port of the worker (all interfaces, like the reference; "
        "or a Twisted endpoint string); keys expire after $OOB_ITEM_EXPIRY_SECONDS (default 20) seconds",
    )
    parser.add_argument(
        "--inspection-port",
        default=None,
        metavar="PORT",
        help="Serve /inspect and /apocalypse on PORT (all interfaces, like the reference; or a Twisted endpoint string)",
    )
    parser.add_argument("--use-request-subprocess", action="store_true", help="Not supported (reference option)")
    jobs = parser.add_mutually_exclusive_group()
    jobs.add_argument(
        "--workers",
        default=default_workers,
        type=int,
        help=f"Number of concurrent jobs (default: $POTHEAD_WORKERS or 1, now {default_workers})",
    )
    jobs.add_argument("--poll-jobs", action="store_true", help="Use app.wait_for_slot to decide when to take a job")
    parser.add_argument("app", nargs="?", default=DEFAULT_APP, help=f"WSGI app as module:attribute (default: {DEFAULT_APP})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, message in UNSUPPORTED.items():
        if getattr(args, name):
            print(f"pothead.worker: {message}", file=sys.stderr)
            return 2
    if args.workers < 1:
        print(f"pothead.worker: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        redirect = _listen_description(args.redirect_response, "--redirect-response")
        inspect = _listen_description(args.inspection_port, "--inspection-port")
        expiry = _expiry_from_environment()
        # Like the original: PROMETHEUS_MULTIPROC_DIR (wiped now, before any
        # metric exists) turns on metrics on PROMETHEUS_PORT (default 9090).
        from ..promdir import metrics_endpoint

        metrics, multiprocess_dir = metrics_endpoint(None)
    except ConfigError as e:
        print(f"pothead.worker: {e}", file=sys.stderr)
        return 2
    config = WorkerConfig(
        metrics=metrics,
        multiprocess_dir=multiprocess_dir,
        connect=(args.connect,),
        app=args.app,
        threads=args.workers,
        poll_jobs=args.poll_jobs,
        redirect=redirect,
        redirect_expiry=expiry,
        inspect=inspect,
    )

    def make(reactor: Any) -> Any:
        from .service import WorkerService
        from .wsgi import load_app

        return WorkerService(config, load_app(config.app), reactor)

    from ..foreground import run

    try:
        return run(make, "pothead.worker")
    except ConfigError as e:
        print(f"pothead.worker: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
