"""
Deployment under systemd: the unit files, sd_notify, socket activation.

- The units in ``systemd/`` pass ``systemd-analyze verify`` with exit 0 *and*
  nothing on stderr (it exits 0 on warnings such as an unknown key), their
  ExecStart lines parse with twistd's own option parser, and the claims their
  comments make (system call filter, W^X) are checked against the daemon.
- ``$NOTIFY_SOCKET`` is a real ``AF_UNIX`` datagram socket bound by the test;
  hub and worker run as ``twistd`` subprocesses and must say READY=1 only once
  they serve, STATUS=, WATCHDOG=1 at half ``$WATCHDOG_USEC``, STOPPING=1 when
  SIGTERM starts the drain.
- Socket activation: the test plays systemd, holding a listening socket and
  passing it as fd 3 with ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``.
- :class:`pothead.sdnotify.SystemdNotifier` itself with a fake clock, reactor
  and sender.

Plain synchronous tests (``no_reactor``); every wait is bounded and every
subprocess is stopped by PID in a ``finally``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, FirstError, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from _interop_procs import TWISTD, Proc, clean_env, free_port, http_request, spawn, stop, wait_for_log
from pothead import sdnotify
from pothead.sdnotify import SystemdNotifier

pytestmark = pytest.mark.no_reactor

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
#: Where the shipped units expect the installation (README: python3 -m venv /opt/pothead).
DOCUMENTED_TWISTD = "/opt/pothead/bin/twistd"


# =============================================================================================
# Unit files
# =============================================================================================


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(path.read_text()) if s == section and k == key]


def unit_value(path: Path, section: str, key: str) -> str:
    values = unit_values(path, section, key)
    assert values, f"{path.name}: no {key}= in [{section}]"
    return values[-1]


def env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile= syntax (KEY=VALUE, optional quotes, # comments)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_environment(path: Path, env_files: Sequence[Path] = ()) -> dict[str, str]:
    """Environment= of the unit, then the env files (which override, as in systemd)."""
    env: dict[str, str] = {}
    for value in unit_values(path, "Service", "Environment"):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val
    for f in env_files:
        env.update(env_file(f))
    return env


def exec_start_argv(path: Path, env: dict[str, str], twistd: str | None = None) -> list[str]:
    """ExecStart= as systemd expands it: ``$VAR`` as a word splits, ``${VAR}`` is one word."""
    argv: list[str] = []
    for word in shlex.split(unit_value(path, "Service", "ExecStart")):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    if twistd is not None:
        assert argv[0] == DOCUMENTED_TWISTD
        argv[0] = twistd
    return argv


def installed_copy(directory: Path) -> Path:
    """The units with ExecStart pointing at this venv's twistd (verify wants an executable)."""
    directory.mkdir(parents=True, exist_ok=True)
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".socket"):
            text = unit.read_text()
            if unit.suffix == ".service":
                assert DOCUMENTED_TWISTD in text, f"{unit.name} does not run {DOCUMENTED_TWISTD}"
            (directory / unit.name).write_text(text.replace(DOCUMENTED_TWISTD, TWISTD))
    return directory


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze is not installed (Debian: apt-get install systemd; `make test` does it as root)"
        if os.environ.get("POTHEAD_REQUIRE_SYSTEMD_ANALYZE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.mark.parametrize(
    "units",
    [
        pytest.param(["pothead-hub.socket", "pothead-hub.service"], id="hub-socket-and-service"),
        pytest.param(["pothead-worker@.service"], id="worker-template"),
        pytest.param(["pothead-worker@demo.service"], id="worker-instance"),
    ],
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, units: list[str]) -> None:
    analyze = systemd_analyze()
    directory = installed_copy(tmp_path / "units")
    result = subprocess.run(
        [analyze, "verify", *(str(directory / u) for u in units)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}),
    )
    # verify exits 0 on warnings (unknown keys, bad values): stderr must be empty too.
    assert result.returncode == 0 and result.stderr == "", (
        f"systemd-analyze verify {units}: exit {result.returncode}\n{result.stderr}{result.stdout}"
    )


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: an unknown key gets exit 0 but a line on stderr."""
    analyze = systemd_analyze()
    directory = installed_copy(tmp_path / "units")
    hub = directory / "pothead-hub.service"
    hub.write_text(hub.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomeTypo=yes"))
    result = subprocess.run(
        [analyze, "verify", str(directory / "pothead-hub.socket"), str(hub)],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )
    assert "ProtectHomeTypo" in result.stderr, (result.returncode, result.stderr)


def _parse_twistd(argv: list[str]) -> Any:
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(argv[1:])
    return options


def test_hub_unit_command_line_parses_and_matches_the_socket() -> None:
    service, sock = UNITS / "pothead-hub.service", UNITS / "pothead-hub.socket"
    for env_files in ([], [UNITS / "hub-example.env"]):
        argv = exec_start_argv(service, unit_environment(service, env_files))
        assert argv[0] == DOCUMENTED_TWISTD
        options = _parse_twistd(argv)
        assert options["nodaemon"] and options["pidfile"] == "" and options["logfile"] == "-", argv
        assert options.subCommand == "pothead-hub"
        config = options.subOptions.config
        # The consumer port is the socket unit's, by the name systemd passes in $LISTEN_FDNAMES.
        name = unit_value(sock, "Socket", "FileDescriptorName")
        assert config.listen == (f"systemd:domain=INET:name={name}",), config.listen
        # ListenStream is IPv4 (domain=INET).
        assert re.fullmatch(r"(\d+\.){3}\d+:\d+", unit_value(sock, "Socket", "ListenStream"))
        # systemd waits for the whole drain before SIGKILL.
        assert float(unit_value(service, "Service", "TimeoutStopSec")) >= config.drain_timeout + 10
    assert unit_value(sock, "Socket", "Service") == service.name
    assert sock.stem in unit_value(service, "Unit", "Requires")


def test_worker_unit_command_line_parses_with_the_example_env() -> None:
    service = UNITS / "pothead-worker@.service"
    assert unit_value(service, "Service", "EnvironmentFile") == "/etc/pothead/worker-%i.env"
    env = unit_environment(service, [UNITS / "worker-example.env"])
    options = _parse_twistd(exec_start_argv(service, env))
    assert options.subCommand == "pothead-worker"
    config = options.subOptions.config
    assert len(config.connect) == 2, config.connect  # several hubs: repeated --connect
    assert config.app == env["POTHEAD_APP"]
    assert config.threads == 4
    assert config.drain_timeout is not None
    assert float(unit_value(service, "Service", "TimeoutStopSec")) >= config.drain_timeout + 10


@pytest.mark.parametrize("unit", ["pothead-hub.service", "pothead-worker@.service"])
def test_service_units_are_notify_type_and_hardened(unit: str) -> None:
    path = UNITS / unit
    assert unit_value(path, "Service", "Type") == "notify"
    assert unit_value(path, "Service", "Restart") == "on-failure"
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
    }
    for key, value in expected.items():
        assert value in unit_values(path, "Service", key), f"{unit}: {key}={value} missing"
    argv = exec_start_argv(path, {})
    assert argv[:5] == [DOCUMENTED_TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "--no_save"], argv
    # Every hardening line carries its reason in a comment just above it.
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Hardening" in line)
    for i, line in enumerate(lines[start:], start):
        if line and not line.startswith(("#", "[")) and "=" in line:
            block = lines[max(start, i - 12) : i]
            assert any(l.startswith("#") for l in block), f"{unit}: no comment explains {line!r}"


# -- what the comments claim ---------------------------------------------------------------


def _expand_syscall_group(analyze: str, name: str) -> set[str]:
    out = subprocess.run([analyze, "syscall-filter", name], capture_output=True, text=True, timeout=30, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= _expand_syscall_group(analyze, item) if item.startswith("@") else {item}
    return calls


def _allowed_syscalls(analyze: str, unit: Path) -> set[str]:
    """What the unit's SystemCallFilter= lines allow (an allow list, then ~deny lists)."""
    allowed: set[str] = set()
    for line in unit_values(unit, "Service", "SystemCallFilter"):
        groups = line.lstrip("~").split()
        calls = set().union(*(_expand_syscall_group(analyze, g) for g in groups))
        if line.startswith("~"):
            allowed -= calls
        else:
            allowed |= calls
    assert allowed, f"{unit.name}: no SystemCallFilter allow list"
    return allowed


def _syscalls_in(summary: Path) -> set[str]:
    used = set()
    for line in summary.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            used.add(parts[-1])
    return used


def _traced_child(proc: Proc) -> int | None:
    """The pid of the program strace runs (stopped by PID like any other)."""
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True, timeout=10)
    pids = [int(p) for p in ps.stdout.split()]
    return pids[0] if pids else None


def _stop_traced(proc: Proc, timeout: float) -> None:
    child = _traced_child(proc)
    if child is not None:
        os.kill(child, 15)
    proc.popen.wait(timeout)


def test_system_calls_fit_the_units_filters(tmp_path: Path) -> None:
    """Every system call of a hub's and a worker's whole life is allowed by its unit's SystemCallFilter=."""
    analyze = systemd_analyze()
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (`make test` installs it as root)")
    listen, workers = free_port(), free_port()
    summaries = {"hub": tmp_path / "strace-hub.txt", "worker": tmp_path / "strace-worker.txt"}
    traced = [strace, "-f", "-qq", "-c", "-o"]
    procs: list[Proc] = []
    try:
        hub = spawn(
            "hub",
            [*traced, str(summaries["hub"]), TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "--no_save",
             "pothead-hub", "--listen", f"tcp:{listen}:interface=127.0.0.1",
             "--workers", f"tcp:{workers}:interface=127.0.0.1", "--drain-timeout", "10",
             "--metrics", f"tcp:{free_port()}:interface=127.0.0.1"],
            cwd=tmp_path,
        )
        procs.append(hub)
        wait_for_log(hub, "listening for workers", timeout=30)
        worker = spawn(
            "worker",
            [*traced, str(summaries["worker"]), TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "--no_save",
             "pothead-worker", "--connect", f"127.0.0.1:{workers}", "--threads", "2", "pothead.demo:app"],
            cwd=tmp_path,
        )
        procs.append(worker)
        wait_for_log(worker, "connected to hub", timeout=30)
        big = os.urandom(300_000)  # above 100 kB: twisted.web spools it to a temporary file
        reply = http_request(listen, "/echo", method="POST", body=big, timeout=20)
        assert (reply.status, reply.body == big) == (200, True), reply.status
        assert http_request(listen, "/hash?rounds=1000", timeout=20).status == 200
        _stop_traced(worker, 20)
        _stop_traced(hub, 20)
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=10)
    for name, unit in (("hub", "pothead-hub.service"), ("worker", "pothead-worker@.service")):
        used = _syscalls_in(summaries[name])
        if not used:
            pytest.skip(f"strace recorded nothing (ptrace not permitted here?)\n{hub.output()[-2000:]}")
        proc = hub if name == "hub" else worker
        assert f"{name} stopped" in proc.output(), proc.describe()
        outside = used - _allowed_syscalls(analyze, UNITS / unit)
        assert not outside, f"{name}: system calls outside {unit}'s SystemCallFilter=: {sorted(outside)}"


_MDWE_LAUNCHER = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""

_PYOPENSSL_CALLBACK = """\
from OpenSSL import SSL
SSL.Context(SSL.TLS_METHOD).set_info_callback(lambda *a: None)
"""


def test_memory_deny_write_execute_claims(tmp_path: Path) -> None:
    """
    The units leave MemoryDenyWriteExecute= off because TLS needs W+X memory
    (pyOpenSSL's cffi callbacks), while the plain-TCP hub would run under it.
    Checked with the kernel's W^X switch (PR_SET_MDWE), the rule systemd applies.
    """
    launcher = tmp_path / "mdwe.py"
    launcher.write_text(_MDWE_LAUNCHER)
    (tmp_path / "tls_callback.py").write_text(_PYOPENSSL_CALLBACK)
    tls = subprocess.run(
        [sys.executable, str(launcher), sys.executable, str(tmp_path / "tls_callback.py")],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )
    if tls.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    assert tls.returncode != 0 and "write+execute" in tls.stderr, (
        "pyOpenSSL callbacks now work under W^X: MemoryDenyWriteExecute=yes could be enabled in the units\n"
        + tls.stderr
    )
    listen, workers = free_port(), free_port()
    with NotifyListener(_short_socket_path()) as notify:
        hub = spawn(
            "hub",
            [sys.executable, str(launcher), TWISTD, "-n", "--pidfile=", "pothead-hub",
             "--listen", f"tcp:{listen}:interface=127.0.0.1", "--workers", f"tcp:{workers}:interface=127.0.0.1",
             "--queue-timeout", "0.3"],
            cwd=tmp_path,
            env=clean_env({"NOTIFY_SOCKET": notify.address}),
        )
        try:
            notify.wait_for("READY=1", 20, hub)
            reply = http_request(listen, "/", method="POST", body=os.urandom(200_000), timeout=10)
            assert reply.status == 503, reply  # queued, spooled, timed out: the hub works under W^X
            assert stop(hub, timeout=10) == 0, hub.describe()
        finally:
            stop(hub, timeout=10)


# =============================================================================================
# sd_notify against a real NOTIFY_SOCKET
# =============================================================================================


def _short_socket_path() -> str:
    # sun_path is 108 bytes: keep clear of pytest's long tmp_path.
    return os.path.join(tempfile.mkdtemp(prefix="pothead-notify-", dir="/tmp"), "notify")


class NotifyListener:
    """An ``AF_UNIX`` datagram socket standing in for systemd's; records (arrival time, datagram)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.socket.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.join(5)
        self.socket.close()
        if not self.address.startswith("@"):
            shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)

    def lines(self, key: str) -> list[tuple[float, str]]:
        """(arrival, value) of every ``KEY=value`` line received."""
        found = []
        for at, text in list(self.messages):
            for line in text.split("\n"):
                if line.startswith(key + "="):
                    found.append((at, line[len(key) + 1 :]))
        return found

    def wait_for(
        self, line: str, timeout: float, proc: Proc | None = None, match: Callable[[str], bool] | None = None
    ) -> tuple[float, str]:
        """The first datagram holding ``line`` (and satisfying ``match``): (arrival, whole datagram)."""
        deadline = time.monotonic() + timeout
        while True:
            for at, text in list(self.messages):
                if line in text.split("\n") and (match is None or match(text)):
                    return at, text
            if proc is not None and not proc.alive():
                raise AssertionError(f"{proc.name} exited before sending {line!r}\n{proc.describe()}\n{self.messages}")
            if time.monotonic() > deadline:
                detail = proc.describe() if proc is not None else ""
                raise AssertionError(f"no {line!r} within {timeout}s; got {self.messages[-10:]}\n{detail}")
            time.sleep(0.01)

    def wait_for_status(self, pattern: str, timeout: float, proc: Proc) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, value in self.lines("STATUS"):
                if re.search(pattern, value):
                    return value
            time.sleep(0.05)
        raise AssertionError(f"no STATUS matching {pattern!r} within {timeout}s: {self.lines('STATUS')}\n{proc.describe()}")


def exit_status(proc: Proc, timeout: float) -> int | None:
    """Wait (bounded) for a process already signalled; None if it is still running."""
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_hub_and_worker_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    listen, workers = free_port(), free_port()
    procs: list[Proc] = []
    with NotifyListener(_short_socket_path()) as hub_notify, NotifyListener(f"@pothead-test-{uuid.uuid4().hex}") as worker_notify:
        try:
            hub = spawn(
                "hub",
                [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", f"tcp:{listen}:interface=127.0.0.1",
                 "--workers", f"tcp:{workers}:interface=127.0.0.1", "--drain-timeout", "10"],
                cwd=tmp_path,
                env=clean_env({"NOTIFY_SOCKET": hub_notify.address, "WATCHDOG_USEC": "400000"}),
            )
            procs.append(hub)
            ready_at, ready = hub_notify.wait_for("READY=1", 20, hub)
            # READY means bound: both ports take connections the moment it arrives.
            assert _connects(listen) and _connects(workers), "READY=1 before the hub's ports were bound"
            assert re.search(r"^STATUS=0 queued, 0 in flight, 0 idle worker connections of 0", ready, re.M), ready
            assert len(hub_notify.lines("READY")) == 1

            worker = spawn(
                "worker",
                [TWISTD, "-n", "--pidfile=", "pothead-worker", "--connect", f"127.0.0.1:{workers}", "--threads", "2",
                 "pothead.demo:app"],
                cwd=tmp_path,
                env=clean_env({"NOTIFY_SOCKET": worker_notify.address}),  # abstract namespace ("@...")
            )
            procs.append(worker)
            _, worker_ready = worker_notify.wait_for("READY=1", 20, worker)
            assert re.search(r"^STATUS=.*\b1 of 1 hubs connected", worker_ready, re.M), worker_ready
            assert "connected to hub" in worker.output()

            # The hub's status line follows its state (re-evaluated every 2 s).
            hub_notify.wait_for_status(r"idle worker connections of 2\b", 8, hub)

            # Watchdog: half of WATCHDOG_USEC=400000, i.e. every 0.2 s, steadily.
            pings = [at for at, value in hub_notify.lines("WATCHDOG") if value == "1" and at >= ready_at]
            assert len(pings) >= 5, pings
            gaps = [b - a for a, b in zip(pings, pings[1:])]
            assert 0.17 <= statistics.median(gaps) <= 0.25, gaps
            window = pings[-1] - pings[0]
            assert abs(len(gaps) - window / 0.2) <= 2, (len(gaps), window)
            assert max(gaps) < 0.4, f"a watchdog gap reached WATCHDOG_USEC: {gaps}"
            assert not worker_notify.lines("WATCHDOG"), "WATCHDOG=1 without WATCHDOG_USEC"

            # SIGTERM with a job running: STOPPING=1 comes while the drain still waits for it.
            results: list[Any] = []
            job = threading.Thread(target=lambda: results.append(http_request(listen, "/sleep?seconds=2", timeout=20)))
            job.start()
            try:
                wait_for_log(worker, "job started", timeout=10)
                os.kill(hub.pid, 15)
                stopping_at, stopping = hub_notify.wait_for("STOPPING=1", 5, hub)
                assert hub.alive() and job.is_alive(), "STOPPING=1 only after the drain"
                assert re.search(r"^STATUS=stopping: .*1 in flight", stopping, re.M), stopping
            finally:
                job.join(20)
            assert results and results[0].status == 200, (results, hub.describe())
            assert exit_status(hub, 15) == 0, hub.describe()
            assert len(hub_notify.lines("STOPPING")) == 1

            os.kill(worker.pid, 15)
            worker_notify.wait_for("STOPPING=1", 5, worker)
            assert exit_status(worker, 15) == 0, worker.describe()
            assert "Traceback" not in hub.output() + worker.output(), hub.describe() + worker.describe()
        finally:
            for proc in reversed(procs):
                stop(proc, timeout=10)


def test_worker_is_ready_while_its_hub_is_unreachable(tmp_path: Path) -> None:
    """An unreachable hub must not hold the unit in "activating": READY once the first attempt failed."""
    nobody = free_port()
    with NotifyListener(f"@pothead-test-{uuid.uuid4().hex}") as notify:
        worker = spawn(
            "worker",
            [TWISTD, "-n", "--pidfile=", "pothead-worker", "--connect", f"127.0.0.1:{nobody}", "pothead.demo:app"],
            cwd=tmp_path,
            env=clean_env({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}),
        )
        try:
            _, ready = notify.wait_for("READY=1", 20, worker)
            assert re.search(r"^STATUS=0 busy, 1 idle slots, 0 of 1 hubs connected", ready, re.M), ready
            assert "cannot connect to hub" in worker.output()
            assert not notify.lines("WATCHDOG"), "WATCHDOG_PID names another process: no pings"
            os.kill(worker.pid, 15)
            notify.wait_for("STOPPING=1", 5, worker)
            assert exit_status(worker, 10) == 0, worker.describe()
        finally:
            stop(worker, timeout=10)


def test_drop_in_worker_command_line_notifies_too(tmp_path: Path) -> None:
    """``python3 -m pothead.worker`` (pothead.foreground) wires the same notifier as twistd."""
    nobody = free_port()
    with NotifyListener(f"@pothead-test-{uuid.uuid4().hex}") as notify:
        worker = spawn(
            "dropin-worker",
            [sys.executable, "-m", "pothead.worker", "--connect", f"127.0.0.1:{nobody}", "pothead.demo:app"],
            cwd=tmp_path,
            env=clean_env({"NOTIFY_SOCKET": notify.address}),
        )
        try:
            _, ready = notify.wait_for("READY=1", 20, worker)
            assert "0 of 1 hubs connected" in ready, ready
            os.kill(worker.pid, 15)
            notify.wait_for("STOPPING=1", 5, worker)
            assert exit_status(worker, 10) == 0, worker.describe()
        finally:
            stop(worker, timeout=10)


# =============================================================================================
# Socket activation
# =============================================================================================

#: Plays systemd's part between fork and exec: the socket becomes fd 3 and
#: LISTEN_PID names the process that will run twistd (exec keeps the pid).
_ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def _activated_hub(tmp_path: Path, name: str, held: socket.socket, argv: list[str], fdname: str, extra: dict[str, str]) -> Proc:
    launcher = tmp_path / "activate.py"
    launcher.write_text(_ACTIVATE)
    env = clean_env({"LISTEN_FDS": "1", "LISTEN_FDNAMES": fdname, **extra})
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, str(launcher), str(held.fileno()), *argv],
            cwd=str(tmp_path),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(held.fileno(),),
        )
    return Proc(name, popen, log)


@pytest.mark.parametrize("how", ["unit-exec-start", "index=0"])
def test_socket_activated_hub_serves_and_keeps_the_port_across_a_restart(tmp_path: Path, how: str) -> None:
    workers = free_port()
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # what pothead-hub.socket holds
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(128)
    port = held.getsockname()[1]
    if how == "unit-exec-start":
        # The shipped unit's own command line, with the worker port moved to loopback.
        service = UNITS / "pothead-hub.service"
        env = unit_environment(service)
        env["POTHEAD_WORKERS"] = f"tcp:{workers}:interface=127.0.0.1"
        argv = exec_start_argv(service, env, twistd=TWISTD)
        fdname = unit_value(UNITS / "pothead-hub.socket", "Socket", "FileDescriptorName")
        extra = {k: v for k, v in env.items() if k.startswith("PYTHON")}
    else:
        argv = [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", "systemd:domain=INET:index=0",
                "--workers", f"tcp:{workers}:interface=127.0.0.1", "--drain-timeout", "10"]
        fdname, extra = "pothead-hub.socket", {}
    procs: list[Proc] = []
    try:
        hub = _activated_hub(tmp_path, "hub-1", held, argv, fdname, extra)
        procs.append(hub)
        wait_for_log(hub, f"listening for consumers on 127.0.0.1:{port}", timeout=20)
        worker = spawn(
            "worker",
            [TWISTD, "-n", "--pidfile=", "pothead-worker", "--connect", f"127.0.0.1:{workers}", "--reconnect-max", "0.3",
             "pothead.demo:app"],
            cwd=tmp_path,
        )
        procs.append(worker)
        wait_for_log(worker, "connected to hub", timeout=15)
        reply = http_request(port, "/echo", method="POST", body=b"through the inherited socket", timeout=10)
        assert (reply.status, reply.body) == (200, b"through the inherited socket"), reply

        # Restart: the old hub drains and exits; the socket stays open (held here,
        # as by systemd), so a request arriving between the two hubs waits in its
        # backlog and the next hub serves it.
        assert stop(hub, timeout=15) == 0, hub.describe()
        assert "Traceback" not in hub.output(), hub.describe()
        results: list[Any] = []
        between = threading.Thread(target=lambda: results.append(http_request(port, "/hello", timeout=20)))
        between.start()
        try:
            time.sleep(0.3)  # the request sits in the socket's backlog while no hub runs
            assert not results, "answered with no hub running?"
            hub2 = _activated_hub(tmp_path, "hub-2", held, argv, fdname, extra)
            procs.append(hub2)
        finally:
            between.join(25)
        assert results and results[0].status == 200, (results, hub2.describe(), worker.describe())
        assert b"Hello from pothead worker" in results[0].body
        assert stop(hub2, timeout=15) == 0, hub2.describe()
        assert stop(worker, timeout=15) == 0, worker.describe()
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=10)
        held.close()


def test_systemd_endpoint_without_an_inherited_socket_is_a_one_line_error(tmp_path: Path) -> None:
    proc = spawn(
        "hub",
        [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", "systemd:domain=INET:index=0",
         "--workers", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path,
        env={k: v for k, v in clean_env().items() if not k.startswith("LISTEN_")},
    )
    try:
        status = proc.popen.wait(15)
    finally:
        stop(proc, timeout=5)
    output = proc.output()
    assert status != 0 and "Traceback" not in output, output
    assert [l for l in output.splitlines() if l.strip()] == [
        "pothead-hub: --listen: 'systemd:domain=INET:index=0': no socket inherited from systemd "
        "(LISTEN_PID/LISTEN_FDS unset: start it through its .socket unit)"
    ], output


# =============================================================================================
# SystemdNotifier, in memory
# =============================================================================================


class FakeReactor(Clock):
    """A Clock with system event triggers, fired in registration order like the real reactor."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[object, str, str, Callable[[], object]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[..., object], *args: object) -> object:
        handle = object()
        self.triggers.append((handle, phase, event, lambda: f(*args)))
        return handle

    def removeSystemEventTrigger(self, handle: object) -> None:
        before = len(self.triggers)
        self.triggers = [t for t in self.triggers if t[0] is not handle]
        assert len(self.triggers) == before - 1, "removed a trigger that is not registered"

    def fire(self, phase: str, event: str) -> None:
        for handle, p, e, f in list(self.triggers):
            if (p, e) == (phase, event):
                self.triggers.remove((handle, p, e, f))
                f()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, data: bytes) -> None:
        self.sent.append(data.decode())

    def lines(self, key: str) -> list[str]:
        return [l for d in self.sent for l in d.split("\n") if l.startswith(key + "=")]


def make_notifier(
    environ: dict[str, str] | None = None,
    ready: Deferred[Any] | None = None,
    status: Callable[[], str] = lambda: "all quiet",
    pid: int = 4242,
) -> tuple[SystemdNotifier, FakeReactor, Recorder, Deferred[Any]]:
    reactor = FakeReactor()
    sent = Recorder()
    ready_d: Deferred[Any] = ready if ready is not None else Deferred()
    notifier = SystemdNotifier(
        ready=lambda: ready_d,
        status=status,
        reactor=reactor,  # type: ignore[arg-type]
        environ={"NOTIFY_SOCKET": "@test", **(environ or {})},
        send=sent,
        pid=pid,
    )
    return notifier, reactor, sent, ready_d


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", "/run/systemd/notify"), ("@abstract", "\0abstract"), ("", None), ("vsock:2:1234", None)],
)
def test_notify_address(value: str, address: str | None) -> None:
    assert sdnotify.notify_address({"NOTIFY_SOCKET": value}) == address
    assert sdnotify.notify_address({}) is None


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(environ, 4242) == interval


def test_without_notify_socket_nothing_happens() -> None:
    reactor = FakeReactor()
    notifier = SystemdNotifier(ready=lambda: succeed(None), status=lambda: "x", reactor=reactor, environ={})  # type: ignore[arg-type]
    assert not notifier.enabled
    notifier.startService()
    assert reactor.triggers == [] and reactor.getDelayedCalls() == []
    notifier.stopService()
    assert sdnotify.attach_notifier(MultiService(), reactor, environ={}) is None


def test_ready_only_when_the_daemon_is_ready_with_its_status() -> None:
    state = {"line": "0 queued"}
    notifier, reactor, sent, ready = make_notifier(status=lambda: state["line"])
    notifier.startService()
    assert sent.lines("READY") == []
    assert sent.lines("STATUS") == ["STATUS=starting: 0 queued"]
    reactor.advance(sdnotify.STATUS_INTERVAL)
    assert sent.lines("STATUS") == ["STATUS=starting: 0 queued"], "an unchanged status is not resent"
    ready.callback(None)
    assert sent.sent[-1] == "READY=1\nSTATUS=0 queued"
    state["line"] = "3 queued"
    reactor.advance(sdnotify.STATUS_INTERVAL - 0.01)
    assert sent.lines("STATUS")[-1] == "STATUS=0 queued"
    reactor.advance(0.01)
    assert sent.lines("STATUS")[-1] == "STATUS=3 queued"
    assert sent.lines("READY") == ["READY=1"]
    notifier.stopService()
    assert reactor.getDelayedCalls() == [] and reactor.triggers == []


def test_ready_at_once_when_already_listening() -> None:
    notifier, _, sent, _ = make_notifier(ready=succeed(None))
    notifier.startService()
    assert sent.sent[0] == "READY=1\nSTATUS=all quiet"
    assert not any(s.startswith("STATUS=starting") for s in sent.sent)
    notifier.stopService()


def test_stopping_goes_out_before_the_application_stops() -> None:
    """
    twistd starts the application, then registers its stopService as a
    "before shutdown" trigger; the notifier registered its own while starting,
    so STOPPING=1 is sent before the parent's drain begins.
    """
    notifier, reactor, sent, ready = make_notifier(ready=succeed(None))
    events: list[str] = []

    class Daemon(MultiService):
        def stopService(self) -> Any:
            events.append("drain begins; sent so far: " + ",".join(l for d in sent.sent for l in d.split("\n") if l == "STOPPING=1"))
            return super().stopService()

    daemon = Daemon()
    notifier.setServiceParent(daemon)
    daemon.startService()  # twistd: startApplication -> startService ...
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)  # ... then this
    reactor.fire("before", "shutdown")
    assert events == ["drain begins; sent so far: STOPPING=1"]
    assert sent.lines("STOPPING") == ["STOPPING=1"], "sent exactly once"
    assert sent.lines("STATUS")[-1].startswith("STATUS=stopping: ")
    assert reactor.getDelayedCalls() == [] and reactor.triggers == []


def test_status_and_watchdog_continue_through_the_drain_until_stopped() -> None:
    notifier, reactor, sent, _ = make_notifier(environ={"WATCHDOG_USEC": "400000"}, ready=succeed(None))
    notifier.startService()
    assert sent.sent[0] == "WATCHDOG=1"
    reactor.advance(0.2)
    reactor.advance(0.2)
    assert len(sent.lines("WATCHDOG")) == 3
    reactor.fire("before", "shutdown")
    for _ in range(5):
        reactor.advance(0.2)
    assert len(sent.lines("WATCHDOG")) == 8, "pings go on during the drain"
    notifier.stopService()
    reactor.advance(10)
    assert len(sent.lines("WATCHDOG")) == 8
    assert reactor.getDelayedCalls() == []


def test_stop_without_shutdown_still_says_stopping_and_no_ready_after_it() -> None:
    notifier, reactor, sent, ready = make_notifier()
    notifier.startService()
    notifier.stopService()
    assert sent.lines("STOPPING") == ["STOPPING=1"]
    ready.callback(None)
    assert sent.lines("READY") == []
    assert reactor.triggers == []


def test_a_failed_start_is_reported_in_the_status() -> None:
    ready: Deferred[Any] = Deferred()
    notifier, _, sent, _ = make_notifier(ready=ready)
    notifier.startService()
    ready.errback(FirstError(Failure(RuntimeError("Address already in use")), 0))
    assert sent.lines("STATUS")[-1] == "STATUS=failed to start: Address already in use"
    assert sent.lines("READY") == []
    notifier.stopService()


def test_send_errors_are_logged_once_and_never_raised() -> None:
    from twisted.logger import Logger

    calls: list[bytes] = []
    logged: list[dict[str, Any]] = []

    def broken(data: bytes) -> None:
        calls.append(data)
        raise ConnectionRefusedError("systemd went away")

    reactor = FakeReactor()
    notifier = SystemdNotifier(
        ready=lambda: succeed(None), status=lambda: "x", reactor=reactor, environ={"WATCHDOG_USEC": "1000000"},  # type: ignore[arg-type]
        send=broken, pid=1,
    )
    notifier._log = Logger(observer=logged.append)  # type: ignore[arg-type]
    notifier.startService()
    for _ in range(120):
        reactor.advance(0.5)
    notifier.stopService()
    assert len(calls) > 100, "it kept trying (watchdog every 0.5 s)"
    assert len(logged) == 1 and "systemd went away" in str(logged[0].get("error")), logged


def test_a_status_bug_does_not_take_the_daemon_down() -> None:
    def status() -> str:
        raise KeyError("queue")

    notifier, _, sent, _ = make_notifier(status=status, ready=succeed(None))
    notifier.startService()
    assert sent.sent[0].startswith("READY=1\nSTATUS=status unavailable")
    notifier.stopService()


def test_datagram_sender_reaches_an_abstract_socket() -> None:
    name = f"pothead-unit-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        address = sdnotify.notify_address({"NOTIFY_SOCKET": "@" + name})
        assert address is not None
        send = sdnotify.DatagramSender(address)
        try:
            send(b"READY=1\nSTATUS=hello")
            send(b"WATCHDOG=1")
            assert server.recv(100) == b"READY=1\nSTATUS=hello"
            assert server.recv(100) == b"WATCHDOG=1"
        finally:
            send.close()


# -- the hub's and the worker's status lines, and the worker's readiness ----------------------


_Obj = SimpleNamespace


def test_hub_status_line() -> None:
    from collections import Counter

    hub = _Obj(
        queue=_Obj(waiting=3, ready=1), jobs=set(range(5)), connections=set(range(4)),
        totals=Counter(request=120), draining=False,
    )
    service = _Obj(hub=hub)
    assert sdnotify.hub_status(service) == "3 queued, 2 in flight, 1 idle worker connections of 4, 120 requests"
    hub.draining = True
    assert sdnotify.hub_status(service).startswith("draining: 3 queued")


def _fake_runtime(**kw: Any) -> Any:
    from collections import Counter

    base = dict(
        slots=[_Obj(request=None), _Obj(request=object())], targets=[1, 2], totals=Counter(job_finished=7),
        stopping=False, observers=[], connected_hubs=lambda: 1,
    )
    base.update(kw)
    return _Obj(**base)


def test_worker_status_line() -> None:
    service = _Obj(runtime=_fake_runtime())
    assert sdnotify.worker_status(service) == "1 busy, 1 idle slots, 1 of 2 hubs connected, 7 jobs"
    service.runtime.stopping = True
    assert sdnotify.worker_status(service).startswith("stopping: 1 busy")


@pytest.mark.parametrize("event", ["connected", "connect_failed"])
def test_worker_ready_on_first_connection_or_first_failure(event: str) -> None:
    runtime = _fake_runtime()
    d = sdnotify.worker_ready(_Obj(runtime=runtime, poller=None))
    fired: list[object] = []
    d.addCallback(fired.append)
    for observer in list(runtime.observers):
        observer("connect_attempt", {})
    assert not fired
    for observer in list(runtime.observers):
        observer(event, {})
    assert len(fired) == 1 and runtime.observers == []


def test_gated_worker_is_ready_at_once() -> None:
    fired: list[object] = []
    sdnotify.worker_ready(_Obj(runtime=_fake_runtime(), poller=object())).addCallback(fired.append)
    assert len(fired) == 1


def test_worker_ready_waits_for_its_own_listeners_too() -> None:
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    from pothead.listening import Listener

    runtime = _fake_runtime()
    worker = MultiService()
    worker.runtime = runtime  # type: ignore[attr-defined]
    worker.poller = None  # type: ignore[attr-defined]
    metrics = Listener(MemoryReactor(), "tcp:0", Factory(), "metrics")
    metrics.setServiceParent(worker)
    fired: list[object] = []
    sdnotify.worker_ready(worker).addCallback(fired.append)
    for observer in list(runtime.observers):
        observer("connected", {})
    assert not fired, "ready before the metrics port is bound"
    metrics.startService()
    assert len(fired) == 1


def test_attach_notifier_makes_it_a_child_that_starts_after_the_listeners() -> None:
    """As the last child it starts after the listeners and stops first -- after the parent's drain."""
    reactor = FakeReactor()
    parent = MultiService()
    parent.hub = _Obj()  # type: ignore[attr-defined]
    parent.when_listening = lambda: succeed(None)  # type: ignore[attr-defined]
    first = MultiService()
    first.setServiceParent(parent)
    notifier = sdnotify.attach_notifier(parent, reactor, environ={"NOTIFY_SOCKET": "@nowhere-" + uuid.uuid4().hex})
    assert notifier is not None and list(parent)[-1] is notifier
