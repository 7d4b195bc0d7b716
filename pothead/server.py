"""
``python3 -m pothead.server [--main-port 8080] [--worker-port 4040]``: the
reference POTHEAD hub's command line, running our hub.

For everything else (queue timeout, limits, TLS, unix sockets, systemd socket
activation) use ``twistd pothead-hub``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import HubConfig


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m pothead.server",
        description="Run a pothead hub (reference-compatible command line; see `twistd pothead-hub --help` for more).",
    )
    parser.add_argument("--main-port", default=8080, type=_port, help="Port for consumers (default: 8080)")
    parser.add_argument("--worker-port", default=4040, type=_port, help="Port where workers connect (default: 4040)")
    args = parser.parse_args(argv)
    config = HubConfig(listen=(f"tcp:{args.main_port}",), workers=(f"tcp:{args.worker_port}",))

    def make(reactor: Any) -> Any:
        from .hub.service import HubService

        return HubService(config, reactor)

    from .foreground import run

    return run(make, "pothead.server")


if __name__ == "__main__":
    sys.exit(main())
