"""
The systems under test, as subprocesses on 127.0.0.1, and the process
bookkeeping that guarantees they are all stopped (by PID) whatever happens.

Every system is a consumer port in front of N single-job worker processes
running ``bench/jobapp.py``:

* ``pothead``        -- ``twistd pothead-hub`` + N x ``twistd pothead-worker --threads 1`` (keep-alive);
* ``pothead-nka``    -- the same workers with ``--no-keep-alive`` (one job per connection);
* ``original``       -- the original POTHEAD 0.10.6 hub + N x ``python -m pothead.worker --workers 1``
  (its own venv, run from a temporary directory), as shipped: the worker waits
  ``LOAD_BALANCER_CONNECTION_DELAY_BASE`` = 1 s before every reconnect;
* ``original-d0``    -- the same with ``LOAD_BALANCER_CONNECTION_DELAY_BASE=0``;
* ``haproxy-lc``     -- HAProxy ``balance leastconn`` with ``maxconn 1`` per server (its queue);
* ``haproxy-rr``     -- HAProxy ``balance roundrobin`` (no per-server limit; the backends queue on the job lock);
  HAProxy's backends are ``bench/backend.py`` (twisted.web + WSGI, the pothead worker's stack).
"""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts; stopped by PID (SIGTERM, then SIGKILL) at exit at the latest."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def spawn(
        self,
        args: Sequence[str],
        *,
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(args),
                cwd=str(cwd) if cwd else None,
                env=env if env is not None else clean_env(),
                stdin=stdin,
                stdout=stdout if stdout is not None else out,
                stderr=out,
            )
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal all of ``procs`` at once, wait up to ``timeout`` in total, SIGKILL the rest."""
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        if procs:
            self.stop(procs, timeout=5.0)


PROCS = Processes()


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def distinct_workers(port: int, n: int, ms: float, timeout: float) -> set[bytes]:
    """Send ``n`` concurrent ``/job?ms=`` requests; the set of worker pids that answered 200."""
    pids: set[bytes] = set()
    lock = threading.Lock()

    def one() -> None:
        try:
            status, body = get(port, f"/job?ms={ms}", timeout=timeout)
        except OSError:
            return
        if status == 200 and body.startswith(b"ok "):
            with lock:
                pids.add(body.split()[1])

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1)
    return pids


# -- systems --------------------------------------------------------------------------------------


class System:
    """A balancer and its workers.  ``port``: consumers; ``hub_pid``: the balancer process."""

    name = "?"
    label = "?"
    #: True when the balancer has a worker port that workers dial (pothead-style).
    reverse = True

    def __init__(self, logs: Path, reference_python: str | None = None) -> None:
        self.logs = logs
        self.reference_python = reference_python
        self.port = 0
        self.worker_port = 0
        self.hub: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._tmp: Path | None = None
        self._runs = 0

    # to override
    def _start_hub(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _worker_args(self) -> tuple[list[str], dict[str, str], Path | None]:
        raise NotImplementedError

    @property
    def hub_pid(self) -> int:
        assert self.hub is not None
        return self.hub.pid

    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"pothead-bench-{self.name}-"))
        return self._tmp

    def start(self, workers: int, *, ready_timeout: float = 60.0) -> None:
        """Start the hub and ``workers`` workers; return once every worker serves a job."""
        self.start_hub()
        if workers:
            self.start_workers(workers)
            self.wait_workers(workers, ready_timeout)

    def start_hub(self) -> None:
        self._runs += 1
        self.port = free_port()
        self.worker_port = free_port()
        self.hub = self._start_hub()

    def start_workers(self, n: int) -> None:
        args, env, cwd = self._worker_args()
        for i in range(n):
            self.workers.append(
                PROCS.spawn(args, log=self.logs / f"{self.name}-{self._runs}-worker{i}.log", cwd=cwd, env=env)
            )

    def wait_workers(self, n: int, timeout: float) -> None:
        """Until ``n`` distinct worker processes answer ``n`` concurrent jobs."""
        deadline = time.monotonic() + timeout
        seen: set[bytes] = set()
        while time.monotonic() < deadline:
            self._check_alive()
            seen = distinct_workers(self.port, n, 300, timeout=10)
            if len(seen) >= n:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: only {len(seen)} of {n} workers answered within {timeout:g}s")

    def _check_alive(self) -> None:
        if self.hub is not None and self.hub.poll() is not None:
            raise RuntimeError(f"{self.name}: the hub exited ({self.hub.returncode}); see {self.logs}")
        dead = [w for w in self.workers if w.poll() is not None]
        if dead:
            raise RuntimeError(f"{self.name}: {len(dead)} worker(s) exited; see {self.logs}")

    def stop(self) -> None:
        procs = list(self.workers) + ([self.hub] if self.hub is not None else [])
        # Workers first would let a pothead hub requeue; stopping all at once is fine between runs.
        PROCS.stop(procs, timeout=10.0)
        self.workers = []
        self.hub = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def versions(self) -> dict[str, str]:
        return {}


class Pothead(System):
    name = "pothead"
    label = "pothead (keep-alive)"
    keep_alive = True

    def _twistd(self) -> str:
        return str(Path(sys.executable).with_name("twistd"))

    def _start_hub(self) -> subprocess.Popen[bytes]:
        log = self.logs / f"{self.name}-{self._runs}-hub.log"
        proc = PROCS.spawn(
            [
                self._twistd(), "-n", "--pidfile=", "pothead-hub",
                "--listen", f"tcp:{self.port}:interface={HOST}:backlog=1024",
                "--workers", f"tcp:{self.worker_port}:interface={HOST}:backlog=1024",
            ],
            log=log,
            cwd=self.tmp(),
        )
        wait_until(lambda: port_accepts(self.port) and port_accepts(self.worker_port) or proc.poll() is not None, 30,
                   f"{self.name} hub listening")
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name}: hub exited; see {log}")
        return proc

    def _worker_args(self) -> tuple[list[str], dict[str, str], Path | None]:
        args = [self._twistd(), "-n", "--pidfile=", "pothead-worker", "--connect", f"{HOST}:{self.worker_port}",
                "--threads", "1"]
        if not self.keep_alive:
            args.append("--no-keep-alive")
        args.append("jobapp:app")
        return args, clean_env({"PYTHONPATH": str(BENCH)}), self.tmp()


class PotheadNoKeepAlive(Pothead):
    name = "pothead-nka"
    label = "pothead --no-keep-alive"
    keep_alive = False


#: The original hub's ``__main__``, unchanged except that it binds 127.0.0.1 (it binds every interface).
ORIGINAL_HUB = '''
import sys
from asyncio import get_event_loop, sleep
from logging import basicConfig, DEBUG
from aiohttp import web
import pothead.server as s

async def main(loop, main_port, worker_port):
    runner = web.ServerRunner(web.Server(s.client_handler))
    await runner.setup()
    await web.TCPSite(runner, host="127.0.0.1", port=main_port).start()
    await loop.create_server(lambda: s.ReverseHttp(loop), host="127.0.0.1", port=worker_port)
    print("======= Running ======", flush=True)
    while True:
        await sleep(100 * 3600)

loop = get_event_loop()
basicConfig(level=DEBUG)
try:
    loop.run_until_complete(main(loop, int(sys.argv[1]), int(sys.argv[2])))
except KeyboardInterrupt:
    pass
'''


class Original(System):
    name = "original"
    label = "original POTHEAD (as shipped)"
    delay_base: str | None = None

    def _python(self) -> str:
        if not self.reference_python:
            raise RuntimeError("the original POTHEAD needs --reference-python (make reference)")
        return self.reference_python

    def _prepare(self) -> Path:
        tmp = self.tmp()
        if not (tmp / "jobapp.py").exists():
            shutil.copy(BENCH / "jobapp.py", tmp / "jobapp.py")
            (tmp / "original_hub.py").write_text(ORIGINAL_HUB)
        return tmp

    def _start_hub(self) -> subprocess.Popen[bytes]:
        tmp = self._prepare()
        log = self.logs / f"{self.name}-{self._runs}-hub.log"
        proc = PROCS.spawn([self._python(), "original_hub.py", str(self.port), str(self.worker_port)], log=log, cwd=tmp)
        wait_until(lambda: port_accepts(self.port) and port_accepts(self.worker_port) or proc.poll() is not None, 30,
                   f"{self.name} hub listening")
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name}: hub exited; see {log}")
        return proc

    def _worker_args(self) -> tuple[list[str], dict[str, str], Path | None]:
        extra = {}
        if self.delay_base is not None:
            extra["LOAD_BALANCER_CONNECTION_DELAY_BASE"] = self.delay_base
        args = [self._python(), "-m", "pothead.worker", "--connect", f"{HOST}:{self.worker_port}", "--workers", "1",
                "jobapp:app"]
        return args, clean_env(extra), self._prepare()

    def versions(self) -> dict[str, str]:
        out = subprocess.run(
            [self._python(), "-c", "import importlib.metadata as m, pothead, aiohttp; "
             "print(m.version('pothead'), aiohttp.__version__, pothead.__file__)"],
            cwd=self._prepare(), env=clean_env(), capture_output=True, text=True, timeout=30,
        )
        version, aiohttp, path = (out.stdout.split() + ["?", "?", "?"])[:3]
        if "/.venv-reference/" not in path and "site-packages" not in path:
            raise RuntimeError(f"the reference interpreter imports pothead from {path}, not the original package")
        return {"original POTHEAD": version, "aiohttp (original)": aiohttp}


class OriginalNoDelay(Original):
    name = "original-d0"
    label = "original POTHEAD, DELAY_BASE=0"
    delay_base = "0"


#: One thread: with its default of one per core (2 here), HAProxy 2.6's leastconn + maxconn 1 queue spun
#: at ~400 us of CPU per request and served less than half the requests/s in a trial on this machine;
#: roundrobin did not care.  The peer gets its better setting.  $BENCH_HAPROXY_GLOBAL replaces this line.
HAPROXY_THREADS = "    nbthread 1"

HAPROXY_CFG = """
global
    # 2 fds per connection and a hard RLIMIT_NOFILE of 20,000 here: at most ~9,990.
    maxconn 9900
{global_extra}
defaults
    mode http
    maxconn 9900
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue 600s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance {balance}
{servers}
"""


class HAProxy(System):
    name = "haproxy-lc"
    label = "HAProxy leastconn + maxconn 1"
    reverse = False
    balance = "leastconn"
    server_opts = " maxconn 1"

    def __init__(self, logs: Path, reference_python: str | None = None) -> None:
        super().__init__(logs, reference_python)
        self.backend_ports: list[int] = []

    def _config(self, ports: Sequence[int]) -> Path:
        servers = "\n".join(f"    server w{i} {HOST}:{p}{self.server_opts}" for i, p in enumerate(ports))
        path = self.tmp() / f"haproxy-{self._runs}.cfg"
        path.write_text(HAPROXY_CFG.format(port=self.port, balance=self.balance, servers=servers,
                                           global_extra=os.environ.get("BENCH_HAPROXY_GLOBAL", HAPROXY_THREADS)))
        return path

    def start(self, workers: int, *, ready_timeout: float = 60.0) -> None:
        self._runs += 1
        self.port = free_port()
        self.backend_ports = [free_port() for _ in range(workers)]
        for i, p in enumerate(self.backend_ports):
            self.workers.append(
                PROCS.spawn([sys.executable, str(BENCH / "backend.py"), "--port", str(p)],
                            log=self.logs / f"{self.name}-{self._runs}-worker{i}.log")
            )
        for p in self.backend_ports:
            wait_until(lambda: port_accepts(p), 30, f"{self.name} backend {p}")
        log = self.logs / f"{self.name}-{self._runs}-haproxy.log"
        self.hub = PROCS.spawn(["haproxy", "-db", "-f", str(self._config(self.backend_ports))], log=log)
        hub = self.hub
        wait_until(lambda: port_accepts(self.port) or hub.poll() is not None, 30, "haproxy listening")
        if hub.poll() is not None:
            raise RuntimeError(f"haproxy exited; see {log}")
        if workers:
            self.wait_workers(workers, ready_timeout)

    def start_hub(self) -> None:
        raise NotImplementedError("HAProxy has no worker port: use start()")

    def versions(self) -> dict[str, str]:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=30)
        return {"haproxy": out.stdout.splitlines()[0] if out.stdout else "?"}


class HAProxyRoundRobin(HAProxy):
    name = "haproxy-rr"
    label = "HAProxy roundrobin"
    balance = "roundrobin"
    server_opts = ""


ALL: list[type[System]] = [Pothead, PotheadNoKeepAlive, Original, OriginalNoDelay, HAProxy, HAProxyRoundRobin]
BY_NAME = {cls.name: cls for cls in ALL}
