"""
Subprocess helpers for the interoperability and command-line tests.

Everything here is synchronous and bounded: reactor tests call the blocking
parts through ``deferToThread``.  Processes are stopped by PID only.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
#: Our twistd, next to the interpreter running the tests (the project venv).
TWISTD = str(Path(sys.executable).with_name("twistd"))


def reference_python() -> str | None:
    """The interpreter of the original POTHEAD 0.10.6 venv, or None if not configured."""
    path = os.environ.get("POTHEAD_REFERENCE_PYTHON")
    if not path:
        return None
    return path


REFERENCE_SKIP_REASON = (
    "POTHEAD_REFERENCE_PYTHON is not set: the original POTHEAD 0.10.6 is needed as a peer "
    "(`make test` creates .venv-reference and sets it)"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test environment without anything that could put /work/main (our
    ``pothead``) on the reference interpreter's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass
class Proc:
    """A subprocess with its combined output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self) -> str:
        return f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) output:\n{self.output()[-6000:]}"


def spawn(name: str, args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> Proc:
    log = cwd / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            list(args),
            cwd=str(cwd),
            env=dict(env) if env is not None else clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(name, popen, log)


def stop(proc: Proc, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """Signal ``proc`` (by PID) and wait up to ``timeout``; SIGKILL if it does not exit.

    Returns the exit status if it exited on its own within ``timeout``, else None."""
    if proc.popen.poll() is not None:
        return proc.popen.returncode
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def kill(proc: Proc) -> None:
    if proc.popen.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
            pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_log(proc: Proc, text: str, timeout: float) -> None:
    def seen() -> bool:
        if text in proc.output():
            return True
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited before logging {text!r}\n{proc.describe()}")
        return False

    wait_for(seen, timeout, f"{proc.name} logs {text!r}")


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection to 127.0.0.1:``port``; every socket operation bounded."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, response.reason, response.getheaders(), data)
    finally:
        connection.close()


# -- the original POTHEAD 0.10.6 as subprocesses --------------------------------

APP_SOURCE = Path(__file__).with_name("_interop_app.py")
APP_MODULE = "interop_app"


def install_app(directory: Path) -> str:
    """Copy the test WSGI app into ``directory`` as a module the reference worker imports."""
    (directory / f"{APP_MODULE}.py").write_text(APP_SOURCE.read_text())
    return f"{APP_MODULE}:app"


def check_reference(python: str, cwd: Path) -> str:
    """Fail loudly unless ``python`` imports the *original* pothead (not ours)."""
    result = subprocess.run(
        [python, "-c", "import pothead, pothead.worker, pothead.server; print(pothead.__file__)"],
        cwd=str(cwd),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{python} cannot import the reference pothead:\n{result.stderr}")
    location = result.stdout.strip()
    if Path(location).resolve().is_relative_to(REPO) and ".venv-reference" not in location:
        raise RuntimeError(f"{python} imports our pothead ({location}), not the reference")
    return location


def spawn_reference_worker(
    python: str, cwd: Path, hub_worker_port: int, app: str, *, workers: int = 1, name: str = "reference-worker"
) -> Proc:
    return spawn(
        name,
        [python, "-m", "pothead.worker", "--connect", f"127.0.0.1:{hub_worker_port}", "--workers", str(workers), app],
        cwd=cwd,
        env=clean_env({"LOAD_BALANCER_CONNECTION_DELAY_BASE": "0"}),
    )


#: Runs ``python -m pothead.server`` unchanged except for the bind address: the
#: original binds every interface (host=None); the tests use loopback only.
_LOOPBACK_LAUNCHER = """\
import asyncio
import runpy
import sys

_create_server = asyncio.BaseEventLoop.create_server


async def _loopback_create_server(self, factory, host=None, *args, **kwargs):
    return await _create_server(self, factory, host or "127.0.0.1", *args, **kwargs)


asyncio.BaseEventLoop.create_server = _loopback_create_server
sys.argv[0] = "pothead.server"
runpy.run_module("pothead.server", run_name="__main__", alter_sys=True)
"""


@dataclass
class ReferenceHub:
    proc: Proc
    main_port: int
    worker_port: int


def start_reference_hub(python: str, cwd: Path, attempts: int = 3) -> ReferenceHub:
    """Start ``python -m pothead.server`` on free ports and wait until it serves (bounded)."""
    last = ""
    for attempt in range(attempts):
        main_port, worker_port = free_port(), free_port()
        if main_port == worker_port:
            continue
        launcher = cwd / "reference_hub_on_loopback.py"
        launcher.write_text(_LOOPBACK_LAUNCHER)
        proc = spawn(
            f"reference-hub-{attempt}",
            [python, str(launcher), "--main-port", str(main_port), "--worker-port", str(worker_port)],
            cwd=cwd,
        )
        try:
            wait_for_log(proc, "======= Running", timeout=20)
        except (RuntimeError, TimeoutError) as e:
            last = f"{e}\n{proc.describe()}"
            kill(proc)
            continue  # most likely a port taken between probing and binding
        return ReferenceHub(proc, main_port, worker_port)
    raise RuntimeError(f"reference hub did not start:\n{last}")
