"""
``make demo``: a hub and a demo worker on loopback, until Ctrl-C.

Starts ``twistd -n pothead-hub`` and ``twistd -n pothead-worker`` as child
processes, waits until a request goes through, prints curl lines to try, and
on Ctrl-C (or SIGTERM) stops both by PID and waits for them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request


def _twistd(python: str) -> list[str]:
    # The twistd script installed next to the interpreter (same venv).
    return [os.path.join(os.path.dirname(python), "twistd")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a pothead hub and a demo worker on 127.0.0.1.")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--hub-port", type=int, default=8080)
    parser.add_argument("--worker-port", type=int, default=4040)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    hub_cmd = _twistd(args.python) + [
        "--nodaemon", "--pidfile=", "pothead-hub",
        f"--listen=tcp:{args.hub_port}:interface=127.0.0.1",
        f"--workers=tcp:{args.worker_port}:interface=127.0.0.1",
        "--queue-timeout=60",
    ]
    worker_cmd = _twistd(args.python) + [
        "--nodaemon", "--pidfile=", "pothead-worker",
        f"--connect=127.0.0.1:{args.worker_port}",
        f"--threads={args.threads}",
        "pothead.demo:app",
    ]
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Explicitly: Python leaves SIGINT ignored if it started ignored (a
    # background job of a non-interactive shell), and Ctrl-C must stop the demo.
    signal.signal(signal.SIGINT, stop)
    try:
        # Own sessions: Ctrl-C reaches only this runner, which then stops each
        # child with exactly one SIGTERM (a second signal would interrupt the drain).
        children.append(subprocess.Popen(hub_cmd, start_new_session=True))
        children.append(subprocess.Popen(worker_cmd, start_new_session=True))
        url = f"http://127.0.0.1:{args.hub_port}/"
        deadline = time.monotonic() + 30
        while True:
            for child in children:
                if child.poll() is not None:
                    print(f"demo: {child.args[3]} exited with status {child.returncode}; "
                          f"is port {args.hub_port} or {args.worker_port} already in use? "
                          "Try: make demo HUB_PORT=18080 WORKER_PORT=14040", file=sys.stderr)
                    return 1
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    response.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    print("demo: the hub did not answer within 30 s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(
            "\n"
            "pothead demo is running: hub on 127.0.0.1:%d (consumers), 127.0.0.1:%d (workers); "
            "one worker with %d slots.\n"
            "Try:\n"
            "  curl -i %s\n"
            "  curl -i '%ssleep?seconds=2'    # run several at once: %d at a time, the rest queue\n"
            "  curl -i --data-binary @README.md %secho\n"
            "Press Ctrl-C to stop.\n"
            % (args.hub_port, args.worker_port, args.threads, url, url, args.threads, url),
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping worker and hub...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    sys.exit(main())
