"""
Workload-B cost of the pothead hub under CPython and under PyPy, in one run::

    .venv/bin/python bench/pypy/measure.py [--pypy .venv-pypy/bin/pypy] [--workers 4]
        [--connections 16,64] [--seconds 4] [--repeat 3] [--pypy-warmup 10] [--out /tmp/pothead-pypy]

Two hubs side by side on 127.0.0.1, each with its own ``--workers`` workers,
identical and always CPython (``twistd pothead-worker --threads 1 jobapp:app``
with PYTHONPATH=bench, as bench/systems.py ``Pothead`` starts them):

* ``cpython``: ``.venv/bin/twistd pothead-hub`` (exactly what ``make bench`` runs);
* ``pypy``: ``pypy bench/pypy/twistd_pothead.py pothead-hub`` (same plugin, same options).

Each hub is warmed up (CPython 1 s of wrk, PyPy ``--pypy-warmup`` s so its
JIT has compiled the hot paths), its idle RSS is taken once its CPU is quiet,
then for every connection count and repetition -- CPython and PyPy
alternating, so drift on the machine hits both alike -- 1 s of wrk warm-up,
0.5 s pause, ``--seconds`` s of ``wrk -t2 -cN --latency /job?ms=0`` with the
hub's utime+stime read from /proc before and after.  Prints the medians over
the repetitions (req/s, p50, p99, hub CPU us/request) and writes all runs as
JSON to ``--out``/results.json.  Every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import systems as S  # noqa: E402
from run import settle, wrk  # noqa: E402

LAUNCHER = Path(__file__).resolve().parent / "twistd_pothead.py"


class Hub(S.Pothead):
    """bench/systems.py's keep-alive pothead, with the hub's interpreter and command chosen."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path) -> None:
        super().__init__(logs)
        self.name = name
        self.command = command
        self.env = env

    def _start_hub(self) -> Any:
        log = self.logs / f"{self.name}-{self._runs}-hub.log"
        proc = S.PROCS.spawn(
            [
                *self.command, "-n", "--pidfile=", "pothead-hub",
                "--listen", f"tcp:{self.port}:interface={S.HOST}:backlog=1024",
                "--workers", f"tcp:{self.worker_port}:interface={S.HOST}:backlog=1024",
            ],
            log=log,
            cwd=self.tmp(),
            env=self.env,
        )
        S.wait_until(
            lambda: S.port_accepts(self.port) and S.port_accepts(self.worker_port) or proc.poll() is not None,
            60, f"{self.name} hub listening",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name}: hub exited; see {log}")
        return proc


def version_of(python: str, env: dict[str, str]) -> str:
    code = "import sys, platform, twisted; print(platform.python_implementation(), sys.version.split()[0], " \
           "'|', sys.version.replace(chr(10), ' '), '| twisted', twisted.__version__)"
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return (done.stdout or done.stderr).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pypy", default=str(S.REPO / ".venv-pypy" / "bin" / "pypy"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", default="16,64")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpython-warmup", type=float, default=1.0)
    parser.add_argument("--pypy-warmup", type=float, default=10.0)
    parser.add_argument("--out", default="/tmp/pothead-pypy")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    cpython_twistd = str(Path(sys.executable).with_name("twistd"))
    pypy_env = S.clean_env({"PYTHONPATH": str(S.REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    hubs = {
        "cpython": Hub("cpython", [cpython_twistd], S.clean_env(), out),
        "pypy": Hub("pypy", [args.pypy, str(LAUNCHER)], pypy_env, out),
    }
    versions = {
        "cpython": version_of(sys.executable, S.clean_env()),
        "pypy": version_of(args.pypy, pypy_env),
    }
    git = subprocess.run(["git", "-C", str(S.REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, timeout=30).stdout.strip()
    versions["pothead"] = git
    for name, v in versions.items():
        print(f"{name}: {v}", flush=True)
    warmups = {"cpython": args.cpython_warmup, "pypy": args.pypy_warmup}
    runs: list[dict[str, Any]] = []
    rss: dict[str, dict[str, int]] = {}
    try:
        for name, hub in hubs.items():
            t0 = time.monotonic()
            hub.start(args.workers)
            rss.setdefault(name, {})["started"] = S.rss_bytes(hub.hub_pid)
            print(f"{name}: hub pid {hub.hub_pid} + {args.workers} workers up in {time.monotonic() - t0:.1f}s; "
                  f"warm-up {warmups[name]:g}s", flush=True)
            wrk(hub.port, max(connections), warmups[name], out, f"{name}-warmup")
            rss[name]["idle_after_warmup"] = settle(hub.hub_pid)
        for c in connections:
            for r in range(args.repeat):
                for name, hub in hubs.items():
                    tag = f"{name}-c{c}-r{r}"
                    wrk(hub.port, c, 1.0, out, tag + "-warmup")
                    time.sleep(0.5)
                    pids = [hub.hub_pid] + [w.pid for w in hub.workers]
                    cpu0 = [S.cpu_seconds(p) for p in pids]
                    result = wrk(hub.port, c, args.seconds, out, tag)
                    cpu1 = [S.cpu_seconds(p) for p in pids]
                    ok = result["requests"] - result["non2xx"]
                    result.update(
                        hub=name, connections=c, repeat=r, workers=args.workers,
                        hub_cpu_us=(cpu1[0] - cpu0[0]) / ok * 1e6 if ok > 0 else None,
                        workers_cpu_us=(sum(cpu1[1:]) - sum(cpu0[1:])) / ok * 1e6 if ok > 0 else None,
                        hub_cpu_share=(cpu1[0] - cpu0[0]) / args.seconds,
                        hub_rss=S.rss_bytes(hub.hub_pid),
                    )
                    runs.append(result)
                    print(f"  {tag}: {result['rps']:.0f} req/s  p50 {result['p50'] * 1e3:.2f} ms  "
                          f"p99 {result['p99'] * 1e3:.2f} ms  hub {result['hub_cpu_us'] or 0:.0f} us/req "
                          f"({result['hub_cpu_share'] * 100:.0f}% of a core)  "
                          f"workers {result['workers_cpu_us'] or 0:.0f} us/req  "
                          f"errors {result['non2xx'] + result['socket_errors']}", flush=True)
        for name, hub in hubs.items():
            rss[name]["idle_after_runs"] = settle(hub.hub_pid)
    finally:
        for hub in hubs.values():
            hub.cleanup()
        S.PROCS.stop_all()

    print()
    print(f"medians of {args.repeat} x {args.seconds:g}s, {args.workers} workers, /job?ms=0")
    print(f"{'hub':8} {'conns':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'hub us/req':>10} {'hub %core':>9} "
          f"{'workers us/req':>14} {'hub RSS MiB':>11}")
    summary = []
    for c in connections:
        for name in hubs:
            mine = [r for r in runs if r["hub"] == name and r["connections"] == c]
            med = {k: statistics.median(r[k] for r in mine)
                   for k in ("rps", "p50", "p99", "hub_cpu_us", "hub_cpu_share", "workers_cpu_us", "hub_rss")}
            med.update(hub=name, connections=c, errors=sum(r["non2xx"] + r["socket_errors"] for r in mine))
            summary.append(med)
            print(f"{name:8} {c:>5} {med['rps']:>7.0f} {med['p50'] * 1e3:>7.2f} {med['p99'] * 1e3:>7.2f} "
                  f"{med['hub_cpu_us']:>10.0f} {med['hub_cpu_share'] * 100:>8.0f}% {med['workers_cpu_us']:>14.0f} "
                  f"{med['hub_rss'] / 2**20:>11.1f}")
    print()
    for name, values in rss.items():
        print(f"{name} hub RSS: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in values.items()))
    print(f"total {time.monotonic() - t_start:.0f}s")
    (out / "results.json").write_text(json.dumps(
        {"versions": versions, "rss": rss, "summary": summary, "runs": runs, "argv": sys.argv,
         "loadavg_at_end": os.getloadavg()}, indent=1, default=str))


if __name__ == "__main__":
    main()
