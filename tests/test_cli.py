"""
The command lines, as an operator meets them: ``twistd pothead-hub`` and
``twistd pothead-worker`` run as real subprocesses.

Plain synchronous tests (marked ``no_reactor``): every subprocess wait is
bounded, every process is stopped by PID in a ``finally``.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

import pytest

from _interop_procs import TWISTD, Proc, clean_env, free_port, http_request, port_accepts, spawn, stop, wait_for, wait_for_log
from pothead.plugin import HubOptions, WorkerOptions

pytestmark = pytest.mark.no_reactor

#: Exit statuses accepted after SIGTERM and a clean drain.  twistd (since
#: Twisted 20.3) re-raises the stop signal on itself after shutting down, which
#: gives -SIGTERM (shell: 143); the brief asks for 0.
CLEAN_SIGTERM_EXIT = (0,)

#: Bound on any command that should fail at start-up.
STARTUP_FAILURE_BOUND = 10.0


def run_bounded(args: Sequence[str], cwd: Path, timeout: float = STARTUP_FAILURE_BOUND) -> tuple[int | None, str]:
    """Run ``twistd ARGS``; return (exit status or None if it was still running after ``timeout``, output)."""
    proc = spawn("twistd", [TWISTD, *args], cwd=cwd, env=clean_env())
    try:
        try:
            status: int | None = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        stop(proc, timeout=5)
    return status, proc.output()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- help ---------------------------------------------------------------------------------------------


def test_twistd_help_lists_both_plugins(tmp_path: Path) -> None:
    result = subprocess.run([TWISTD, "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^\s+(pothead-\w+)\s+(\S.*)$", result.stdout, re.M)}
    assert set(listed) >= {"pothead-hub", "pothead-worker"}, result.stdout
    assert "hub" in listed["pothead-hub"]
    assert "worker" in listed["pothead-worker"]


_OPTION_LINE = re.compile(r"^\s+(?:-(\w), )?--([\w-]+)(=?)\s*(.*)$")


def parse_help(text: str) -> dict[str, str]:
    """``--name`` -> its help text (continuation lines joined)."""
    options: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            current = match.group(2)
            options[current] = match.group(4).strip()
        elif current is not None and line.startswith(" " * 8) and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    return options


@pytest.mark.parametrize(
    ("plugin", "options_class", "must_have"),
    [
        (
            "pothead-hub",
            HubOptions,
            {"listen", "workers", "queue-timeout", "max-queue", "max-body", "max-header-size", "drain-timeout",
             "consumer-timeout", "retry-after"},
        ),
        ("pothead-worker", WorkerOptions, {"connect", "threads", "drain-timeout", "reconnect-max", "no-keep-alive"}),
    ],
)
def test_plugin_help_shows_every_option_with_help_text(
    tmp_path: Path, plugin: str, options_class: type, must_have: set[str]
) -> None:
    result = subprocess.run(
        [TWISTD, plugin, "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    shown = parse_help(result.stdout)
    declared = {name.rstrip("=") for name in options_class().longOpt} - {"help", "version"}
    assert declared >= must_have
    missing = declared - set(shown)
    assert not missing, f"options not in `twistd {plugin} --help`: {sorted(missing)}\n{result.stdout}"
    undocumented = sorted(name for name in declared if len(shown[name]) < 15)
    assert not undocumented, f"options without help text: {undocumented}\n{result.stdout}"
    if plugin == "pothead-worker":
        assert "MODULE:APP" in result.stdout


# -- bad input: one line, non-zero, no traceback ----------------------------------------------------

_HUB = ["-n", "--pidfile=", "pothead-hub"]
_HUB_LOOPBACK = ["--listen", "tcp:0:interface=127.0.0.1", "--workers", "tcp:0:interface=127.0.0.1"]
_WORKER = ["-n", "--pidfile=", "pothead-worker", "--connect", "127.0.0.1:1"]

BAD_INPUT = [
    pytest.param(_HUB + _HUB_LOOPBACK + ["--max-body", "banana"], "--max-body", id="hub-max-body-banana"),
    pytest.param(_HUB + _HUB_LOOPBACK + ["--queue-timeout", "-1"], "--queue-timeout", id="hub-queue-timeout-negative"),
    pytest.param(_HUB + _HUB_LOOPBACK + ["--max-queue", "lots"], "--max-queue", id="hub-max-queue-word"),
    pytest.param(_HUB + _HUB_LOOPBACK + ["--drain-timeout", "nan"], "--drain-timeout", id="hub-drain-timeout-nan"),
    pytest.param(_HUB + _HUB_LOOPBACK + ["--bogus"], "--bogus", id="hub-unknown-option"),
    pytest.param(
        _HUB + ["--listen", "nonsense:endpoint", "--workers", "tcp:0:interface=127.0.0.1"], "--listen", id="hub-listen-nonsense"
    ),
    pytest.param(
        _HUB + ["--listen", "tcp:0:interface=127.0.0.1", "--workers", "nonsense:endpoint"], "--workers", id="hub-workers-nonsense"
    ),
    pytest.param(_WORKER + ["--threads", "0", "pothead.demo:app"], "--threads", id="worker-threads-0"),
    pytest.param(_WORKER + ["--threads", "many", "pothead.demo:app"], "--threads", id="worker-threads-word"),
    pytest.param(_WORKER + ["--reconnect-max", "0", "pothead.demo:app"], "--reconnect-max", id="worker-reconnect-max-0"),
    pytest.param(_WORKER + ["nosuchmodule:app"], "nosuchmodule", id="worker-no-such-module"),
    pytest.param(_WORKER + ["pothead.demo:nosuch"], "nosuch", id="worker-no-such-attribute"),
    pytest.param(_WORKER + ["pothead.demo"], "MODULE:", id="worker-app-without-colon"),
    pytest.param(_WORKER + ["pothead.demo:__doc__"], "callable", id="worker-app-not-callable"),
    pytest.param(_WORKER + ["broken_app:app"], "boom at import", id="worker-app-import-fails"),
    pytest.param(_WORKER + ["a:b", "c:d"], "argument", id="worker-two-apps"),
    pytest.param(
        ["-n", "--pidfile=", "pothead-worker", "--connect", "nonsense:endpoint", "pothead.demo:app"],
        "--connect",
        id="worker-connect-nonsense",
    ),
]


@pytest.mark.parametrize(("args", "mentions"), BAD_INPUT)
def test_bad_input_is_one_line_error(tmp_path: Path, args: list[str], mentions: str) -> None:
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('boom at import')\n")
    status, output = run_bounded(args, tmp_path)
    assert status is not None, f"still running after {STARTUP_FAILURE_BOUND}s: {args}\n{output}"
    assert status != 0, output
    assert "Traceback" not in output, output
    shown = lines(output)
    assert len(shown) == 1, f"expected a one-line error, got {len(shown)} lines:\n{output}"
    assert mentions in shown[0], shown[0]


@pytest.mark.parametrize("role", ["listen", "workers"])
def test_hub_exits_when_its_port_is_taken(tmp_path: Path, role: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        endpoints = {"listen": "tcp:0:interface=127.0.0.1", "workers": "tcp:0:interface=127.0.0.1"}
        endpoints[role] = f"tcp:{port}:interface=127.0.0.1"
        status, output = run_bounded(
            _HUB + ["--listen", endpoints["listen"], "--workers", endpoints["workers"]], tmp_path, timeout=6
        )
    assert status is not None, (
        f"the hub kept running for 6 s without its --{role} port {port} (already in use)\n{output}"
    )
    assert status != 0, output
    assert "Traceback" not in output, output
    # One clear line names the option, the port and the reason (log lines may precede it).
    clear = [line for line in lines(output) if "in use" in line.lower() and str(port) in line and f"--{role}" in line]
    assert clear, f"no line names --{role}, port {port} and 'in use':\n{output}"


# -- end to end ----------------------------------------------------------------------------------------


def _start_hub(tmp_path: Path, listen: int, workers: int) -> Proc:
    hub = spawn(
        "hub",
        [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", f"tcp:{listen}:interface=127.0.0.1",
         "--workers", f"tcp:{workers}:interface=127.0.0.1", "--drain-timeout", "10"],
        cwd=tmp_path,
    )
    wait_for_log(hub, "listening for workers", timeout=15)
    wait_for(lambda: port_accepts(listen), 10, "hub accepts consumers")
    return hub


def _start_worker(tmp_path: Path, workers: int, threads: int = 2) -> Proc:
    worker = spawn(
        "worker",
        [TWISTD, "-n", "--pidfile=", "pothead-worker", "--connect", f"127.0.0.1:{workers}", "--threads", str(threads),
         "pothead.demo:app"],
        cwd=tmp_path,
    )
    wait_for_log(worker, "connected to hub", timeout=15)
    return worker


def _sigterm(proc: Proc, bound: float = 15.0) -> tuple[int | None, float]:
    began = time.monotonic()
    status = stop(proc, timeout=bound)
    return status, time.monotonic() - began


def test_hub_and_worker_serve_and_stop_on_sigterm(tmp_path: Path) -> None:
    listen, workers = free_port(), free_port()
    procs: list[Proc] = []
    try:
        hub = _start_hub(tmp_path, listen, workers)
        procs.append(hub)
        worker = _start_worker(tmp_path, workers)
        procs.append(worker)

        hello = http_request(listen, "/hello?x=1", timeout=10)
        assert hello.status == 200, hello
        assert f"Hello from pothead worker pid {worker.pid}".encode() in hello.body
        assert hello.header("X-Request-Id")

        echo = http_request(listen, "/echo", method="POST", body=b"via twistd", timeout=10)
        assert (echo.status, echo.body) == (200, b"via twistd")

        # --threads 2: two jobs at once.
        results: list[object] = []
        began = time.monotonic()
        threads = [
            threading.Thread(target=lambda: results.append(http_request(listen, "/sleep?seconds=1", timeout=10)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert len(results) == 2 and all(r.status == 200 for r in results), results  # type: ignore[attr-defined]
        assert time.monotonic() - began < 1.9

        worker_status, worker_took = _sigterm(worker)
        hub_status, hub_took = _sigterm(hub)
        outputs = hub.describe() + "\n" + worker.describe()
        assert worker_status is not None, f"worker still running 15 s after SIGTERM\n{outputs}"
        assert hub_status is not None, f"hub still running 15 s after SIGTERM\n{outputs}"
        assert worker_took < 5 and hub_took < 5, (worker_took, hub_took)
        assert "Traceback" not in hub.output() + worker.output(), outputs
        assert "worker stopped" in worker.output() and "hub stopped" in hub.output(), outputs
        assert worker_status in CLEAN_SIGTERM_EXIT and hub_status in CLEAN_SIGTERM_EXIT, (
            f"exit statuses after SIGTERM: worker {worker_status}, hub {hub_status} (want {CLEAN_SIGTERM_EXIT})"
        )
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=10)


def test_sigterm_to_worker_finishes_the_running_job(tmp_path: Path) -> None:
    listen, workers = free_port(), free_port()
    procs: list[Proc] = []
    try:
        hub = _start_hub(tmp_path, listen, workers)
        procs.append(hub)
        worker = _start_worker(tmp_path, workers, threads=1)
        procs.append(worker)

        results: list[object] = []
        job = threading.Thread(target=lambda: results.append(http_request(listen, "/sleep?seconds=1.5", timeout=15)))
        job.start()
        try:
            wait_for_log(worker, "job started", timeout=10)
            began = time.monotonic()
            status = stop(worker, timeout=15)
            took = time.monotonic() - began
        finally:
            job.join(20)
        assert results and results[0].status == 200, (results, worker.describe())  # type: ignore[attr-defined]
        assert b"slept 1.5s" in results[0].body  # type: ignore[attr-defined]
        assert status is not None, worker.describe()
        assert 0.5 < took < 10, took  # it waited for the job, then exited
        assert "Traceback" not in worker.output(), worker.describe()
        assert status in CLEAN_SIGTERM_EXIT, f"worker exit status {status} after SIGTERM (want {CLEAN_SIGTERM_EXIT})"
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=10)
