"""
The peer benchmark: pothead against HAProxy and the original POTHEAD, on one
machine, in one run (``make bench``; ``make bench-quick`` for a smoke run).

    .venv/bin/python bench/run.py [--quick] [--reference-python .venv-reference/bin/python]
                                  [--workloads A,B,C] [--systems pothead,haproxy-lc,...]

Workloads (see bench/RESULTS.md for the numbers and the method):

* A -- scheduling quality: the same open-loop trace (Poisson arrivals from a
  fixed seed, lognormal or Pareto job sizes of mean 100 ms, 50/80/95 % load
  of 4 workers) replayed into every system, one system at a time; p50 and p99
  latency divided by the ideal M/G/4 FIFO queue's on that trace
  (bench/simulate.py).
* B -- cost: wrk closed loop on a trivial job; requests/s, latency, and the
  balancer's CPU time per request (utime+stime from /proc before and after).
* C -- scale and memory: balancer RSS with 10,000 queued requests, with 1,000
  idle worker connections, while 1 GB goes through each way; time to drain
  the 10,000 once 16 workers connect.

Everything listens on 127.0.0.1; every wait is bounded; every process started
is stopped by PID (bench/systems.py), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import simulate  # noqa: E402
import systems as S  # noqa: E402

PY = sys.executable


@dataclass
class Plan:
    a_cells: list[tuple[str, float, int]]
    a_original_cells: int  # the as-shipped original runs only the first N cells (it cannot keep up)
    b_workers: tuple[int, ...]
    b_connections: tuple[int, ...]
    b_seconds: float
    c_queued: int
    c_idle: int
    c_bytes: int
    c_form_bytes: int
    c_drain_workers: int
    c_queue_systems: tuple[str, ...]


FULL = Plan(
    a_cells=[
        ("lognormal", 0.50, 350),
        ("lognormal", 0.80, 450),
        ("lognormal", 0.95, 550),
        ("pareto", 0.50, 350),
        ("pareto", 0.80, 450),
        ("pareto", 0.95, 550),
    ],
    a_original_cells=1,
    b_workers=(4, 16),
    b_connections=(16, 64),
    b_seconds=4.0,
    c_queued=10_000,
    c_idle=1_000,
    c_bytes=2**30,
    c_form_bytes=32 * 2**20,
    c_drain_workers=16,
    c_queue_systems=("pothead", "pothead-nka", "original", "original-d0", "haproxy-lc"),
)

QUICK = Plan(
    a_cells=[("lognormal", 0.80, 200), ("pareto", 0.95, 200)],
    a_original_cells=1,
    b_workers=(4,),
    b_connections=(16,),
    b_seconds=2.0,
    c_queued=2_000,
    c_idle=200,
    c_bytes=100 * 2**20,
    c_form_bytes=8 * 2**20,
    c_drain_workers=16,
    c_queue_systems=("pothead", "original-d0", "haproxy-lc"),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Lines:
    """A subprocess's stdout lines, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._q.put(raw.decode(errors="replace").strip())
        self._q.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} line within {timeout:g}s")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"process exited (rc {self.proc.wait()}) before printing {prefix!r}")
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()


def stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v == v]
    return {
        "p50": simulate.percentile(finite, 50),
        "p90": simulate.percentile(finite, 90),
        "p99": simulate.percentile(finite, 99),
        "max": max(finite) if finite else float("nan"),
        "mean": sum(finite) / len(finite) if finite else float("nan"),
    }


# -- workload A -------------------------------------------------------------------------------------


def workload_a(plan: Plan, names: list[str], ctx: "Context") -> dict[str, Any]:
    out = ctx.out / "A"
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    for dist, load, count in plan.a_cells:
        trace = simulate.make_trace(dist, load, count, servers=4, seed=ctx.seed)
        ideal = simulate.simulate_fifo(trace.arrivals, trace.sizes, trace.servers)
        path = out / f"trace-{dist}-{int(load * 100)}.json"
        path.write_text(json.dumps(trace.to_json()))
        cells.append((trace, ideal, path))

    results: dict[str, Any] = {"cells": [], "systems": names}
    running: dict[str, S.System] = {}
    try:
        for name in names:
            system = ctx.system(name)
            log(f"A: starting {name} with 4 workers")
            system.start(4)
            running[name] = system
        for index, (trace, ideal, path) in enumerate(cells):
            ip50 = simulate.percentile(ideal.latencies, 50)
            ip99 = simulate.percentile(ideal.latencies, 99)
            cell: dict[str, Any] = {
                "distribution": trace.distribution,
                "load": trace.load,
                "count": len(trace),
                "rate": trace.rate,
                "duration": trace.arrivals[-1],
                "mean_size": sum(trace.sizes) / len(trace),
                "ideal": {"p50": ip50, "p99": ip99, "latencies": sorted(ideal.latencies)},
                "systems": {},
            }
            # Rotate the order from cell to cell, so no system always runs first (or last).
            order = names[index % len(names):] + names[: index % len(names)]
            for name in order:
                if name == "original" and index >= plan.a_original_cells:
                    cell["systems"][name] = {"skipped": "could not keep up with the 50 % load cell already"}
                    continue
                system = running.get(name)
                if system is None:
                    system = ctx.system(name)
                    system.start(4)
                    running[name] = system
                grace = 5.0 if name == "original" else 15.0
                deadline = ideal.finish + grace
                log(f"A: {trace.distribution} {trace.load:.0%} ({len(trace)} jobs, {trace.arrivals[-1]:.0f}s) -> {name}")
                cell["systems"][name] = replay_one(system, path, deadline, out, ip50, ip99, trace, ideal)
                r = cell["systems"][name]
                log(f"   p50/ideal {r['p50_ratio']:.3f}  p99/ideal {r['p99_ratio']:.3f}  incomplete {r['incomplete']}  "
                    f"client lag p99 {r['lag']['p99'] * 1000:.2f} ms")
                if name == "original":
                    # Its queue keeps the abandoned requests: never reuse it.
                    system.cleanup()
                    running.pop(name)
            results["cells"].append(cell)
    finally:
        for system in running.values():
            system.cleanup()
    return results


def replay_one(
    system: S.System, trace_path: Path, deadline: float, out: Path, ip50: float, ip99: float,
    trace: simulate.Trace, ideal: simulate.Ideal,
) -> dict[str, Any]:
    tag = f"{system.name}-{trace.distribution}-{int(trace.load * 100)}"
    result_path = out / f"result-{tag}.json"
    proc = S.PROCS.spawn(
        [PY, str(BENCH / "replay.py"), "--port", str(system.port), "--trace", str(trace_path),
         "--deadline", f"{deadline:.3f}", "--out", str(result_path)],
        log=out / f"client-{tag}.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    lines = Lines(proc)
    try:
        lines.expect("READY", 60)
        cpu0 = S.cpu_seconds(system.hub_pid)
        lines.send(f"{time.time() + 0.5:.6f}")
        lines.expect("DONE", deadline + 30)
        cpu1 = S.cpu_seconds(system.hub_pid)
        proc.wait(10)
    finally:
        S.PROCS.stop([proc], timeout=5)
    raw = json.loads(result_path.read_text())
    latencies = [
        lat if lat is not None and st == 200 else float("inf") for lat, st in zip(raw["latency"], raw["status"])
    ]
    completed = sum(1 for v in latencies if v != float("inf"))
    lags = [v for v in raw["lag"] if v is not None]
    p50 = simulate.percentile(latencies, 50)
    p99 = simulate.percentile(latencies, 99)
    overhead = [lat - il for lat, il, w in zip(latencies, ideal.latencies, ideal.waits) if w == 0 and lat != float("inf")]
    return {
        "p50": p50,
        "p99": p99,
        "p50_ratio": p50 / ip50,
        "p99_ratio": p99 / ip99,
        "mean": sum(latencies) / len(latencies),
        "completed": completed,
        "incomplete": len(latencies) - completed,
        "errors": raw["errors"],
        "lag": stats(lags),
        "no_wait_overhead": stats(overhead),
        "hub_cpu_us_per_request": (cpu1 - cpu0) / max(1, completed) * 1e6,
        "latencies": sorted(latencies),
    }


# -- workload B -------------------------------------------------------------------------------------

WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(text: str) -> dict[str, Any]:
    def duration(value: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
        return float(m.group(1)) * WRK_UNITS[m.group(2)] if m else float("nan")

    result: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    result["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    result["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        result[f"p{pct}"] = duration(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    result["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return result


def wrk(port: int, connections: int, seconds: float, out: Path, tag: str) -> dict[str, Any]:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
            f"http://{S.HOST}:{port}/job?ms=0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    (out / f"wrk-{tag}.txt").write_text(done.stdout + done.stderr)
    return parse_wrk(done.stdout)


def workload_b(plan: Plan, names: list[str], ctx: "Context") -> dict[str, Any]:
    out = ctx.out / "B"
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for w, workers in enumerate(plan.b_workers):
        for name in names:
            if name == "original" and w > 0:
                # Its 1 s pause before every reconnect caps it at ~1 job/s per worker: one configuration shows it.
                continue
            system = ctx.system(name)
            try:
                for i, connections in enumerate(plan.b_connections):
                    if name == "original" and i > 0:
                        continue
                    if system.hub is None:
                        log(f"B: starting {name} with {workers} workers")
                        system.start(workers)
                    tag = f"{name}-w{workers}-c{connections}"
                    log(f"B: {name}: {workers} workers, {connections} connections, {plan.b_seconds:g}s")
                    wrk(system.port, connections, 1.0, out, tag + "-warmup")
                    time.sleep(0.5 if name != "original" else 0.0)
                    pids = [system.hub_pid] + [w.pid for w in system.workers]
                    cpu0 = [S.cpu_seconds(p) for p in pids]
                    result = wrk(system.port, connections, plan.b_seconds, out, tag)
                    cpu1 = [S.cpu_seconds(p) for p in pids]
                    ok = result["requests"] - result["non2xx"]
                    result.update(
                        system=name, workers=workers, connections=connections,
                        hub_cpu_us=(cpu1[0] - cpu0[0]) / ok * 1e6 if ok > 0 else None,
                        workers_cpu_us=(sum(cpu1[1:]) - sum(cpu0[1:])) / ok * 1e6 if ok > 0 else None,
                        hub_cpu_share=(cpu1[0] - cpu0[0]) / plan.b_seconds,
                    )
                    runs.append(result)
                    log(f"   {result['rps']:.0f} req/s  p50 {result['p50'] * 1000:.2f} ms  p99 {result['p99'] * 1000:.2f} ms  "
                        f"hub {result['hub_cpu_us'] or 0:.0f} us/req  errors {result['non2xx'] + result['socket_errors']}")
            finally:
                system.cleanup()
    return {"runs": runs, "seconds": plan.b_seconds}


# -- workload C -------------------------------------------------------------------------------------


def settle(pid: int, timeout: float = 30.0, quiet: float = 1.0) -> int:
    """Wait until ``pid`` uses no CPU for ``quiet`` seconds (or ``timeout``); return its RSS then."""
    deadline = time.monotonic() + timeout
    last_cpu = S.cpu_seconds(pid)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        cpu = S.cpu_seconds(pid)
        if cpu - last_cpu > 0.005:
            quiet_since = time.monotonic()
        last_cpu = cpu
        if time.monotonic() - quiet_since >= quiet:
            break
    return S.rss_bytes(pid)


def warm_hub(system: S.System) -> int:
    """Serve a few jobs through one worker, stop it, and return the hub's settled RSS (the baseline)."""
    system.start(1)
    S.distinct_workers(system.port, 4, 0, timeout=10)
    S.PROCS.stop(system.workers, timeout=10)
    system.workers = []
    return settle(system.hub_pid)


class Sampler:
    """Peak RSS of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.peak = S.rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, args=(interval,))
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, S.rss_bytes(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def c_queue_and_drain(plan: Plan, name: str, ctx: "Context", out: Path) -> dict[str, Any]:
    system = ctx.system(name)
    n = plan.c_queued
    result: dict[str, Any] = {"system": name, "queued": n, "wait": 12.0 if name == "original" else 150.0}
    try:
        if isinstance(system, S.HAProxy):
            # HAProxy answers 503 at once when no server is up: its queue only exists behind busy servers.
            system.start(plan.c_drain_workers)
            S.distinct_workers(system.port, plan.c_drain_workers, 0, timeout=10)
            baseline = settle(system.hub_pid)
            occupy_ms = 9000 if n >= 5000 else 5000
            extra = ["--occupy", str(plan.c_drain_workers), "--occupy-ms", str(occupy_ms)]
            result["note"] = f"queued behind {plan.c_drain_workers} servers busy with a {occupy_ms / 1000:g} s job"
        else:
            baseline = warm_hub(system)
            extra = []
        # The shipped original drains ~16 jobs/s: give it a bounded look, not 10 minutes.
        wait = 12.0 if name == "original" else 150.0
        crowd = S.PROCS.spawn(
            [PY, str(BENCH / "crowd.py"), "requests", "--port", str(system.port), "--count", str(n),
             "--deadline", "120", "--wait", str(wait), "--out", str(out / f"crowd-{name}.json"), *extra],
            log=out / f"crowd-{name}.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        lines = Lines(crowd)
        try:
            sent = lines.expect("SENT", 120).split()
            result["written"] = int(sent[1])
            result["connect_failed"] = int(sent[2])
            queued_rss = settle(system.hub_pid, timeout=30)
            result.update(baseline_rss=baseline, queued_rss=queued_rss,
                          per_request_bytes=(queued_rss - baseline) / max(1, int(sent[1])))
            log(f"C: {name}: {sent[1]} queued: RSS {baseline / 2**20:.1f} -> {queued_rss / 2**20:.1f} MiB "
                f"({result['per_request_bytes'] / 1024:.1f} KiB per request)")
            spawned = time.time()
            if not isinstance(system, S.HAProxy):
                system.start_workers(plan.c_drain_workers)
            lines.send("GO")
            lines.expect("DONE", wait + 30)
            crowd.wait(10)
        finally:
            S.PROCS.stop([crowd], timeout=5)
        data = json.loads((out / f"crowd-{name}.json").read_text())
        times = sorted(t for t, st in zip(data["finished"], data["status"]) if t is not None and st == 200)
        result["completed"] = len(times)
        if times:
            result["first_after_spawn"] = times[0] - spawned
            result["drain_seconds"] = times[-1] - times[0]
            result["drain_rate"] = (len(times) - 1) / max(1e-9, times[-1] - times[0])
        log(f"C: {name}: drained {len(times)}/{n} in {result.get('drain_seconds', float('nan')):.2f}s "
            f"(first response {result.get('first_after_spawn', float('nan')):.2f}s after the workers were started)")
    finally:
        system.cleanup()
    return result


def c_idle_connections(plan: Plan, name: str, ctx: "Context", out: Path) -> dict[str, Any]:
    system = ctx.system(name)
    try:
        baseline = warm_hub(system)
        crowd = S.PROCS.spawn(
            [PY, str(BENCH / "crowd.py"), "idle", "--port", str(system.worker_port), "--count", str(plan.c_idle),
             "--deadline", "60"],
            log=out / f"idle-{name}.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        lines = Lines(crowd)
        try:
            connected = int(lines.expect("CONNECTED", 60).split()[1])
            rss = settle(system.hub_pid)
            lines.send("close")
            lines.expect("DONE", 30)
        finally:
            S.PROCS.stop([crowd], timeout=5)
        result = {"system": name, "connections": connected, "baseline_rss": baseline, "rss": rss,
                  "per_connection_bytes": (rss - baseline) / max(1, connected)}
        log(f"C: {name}: {connected} idle worker connections: RSS {baseline / 2**20:.1f} -> {rss / 2**20:.1f} MiB "
            f"({result['per_connection_bytes'] / 1024:.1f} KiB each)")
        return result
    finally:
        system.cleanup()


def _send_all(sock: socket.socket, total: int) -> None:
    chunk = bytes(1 << 20)
    left = total
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        sock.sendall(piece)
        left -= len(piece)


def _read_response(sock: socket.socket) -> tuple[int, int]:
    """Read a response to EOF; (status, body bytes, after undoing chunked framing)."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if not data:
            break
        head += data
    header, _, rest = head.partition(b"\r\n\r\n")
    parts = header.split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    chunked = re.search(rb"(?im)^transfer-encoding:.*chunked", header) is not None
    counter = _Dechunker() if chunked else None
    body = counter.feed(rest) if counter else len(rest)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(buf)
        if not got:
            break
        body += counter.feed(bytes(view[:got])) if counter else got
    return status, body


class _Dechunker:
    """Counts the payload bytes of a chunked body fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._left = 0  # payload bytes left in the current chunk
        self._line = b""  # a partial chunk-size line
        self._skip = 0  # CRLF bytes after a chunk's data still to skip

    def feed(self, data: bytes) -> int:
        payload = 0
        i = 0
        n = len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                payload += take
                self._left -= take
                i += take
                if not self._left:
                    self._skip = 2
            elif self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
            else:
                end = data.find(b"\n", i)
                if end < 0:
                    self._line += data[i:]
                    break
                line = (self._line + data[i:end]).strip()
                self._line = b""
                i = end + 1
                size = line.split(b";", 1)[0]
                if size:
                    self._left = int(size, 16)
        return payload


FORM_HEAD = (b'--bench\r\nContent-Disposition: form-data; name="file"; filename="zeros.bin"\r\n'
             b"Content-Type: application/octet-stream\r\n\r\n")
FORM_TAIL = b"\r\n--bench--\r\n"


def transfer(port: int, direction: str, total: int, timeout: float) -> dict[str, Any]:
    """``upload``: POST ``total`` bytes (application/octet-stream); ``form``: the same bytes as one file
    of a multipart/form-data upload (a browser's form post); ``download``: GET ``total`` bytes."""
    with socket.create_connection((S.HOST, port), timeout=timeout) as sock:
        began = time.monotonic()
        if direction == "upload":
            sock.sendall(
                f"POST /upload HTTP/1.1\r\nHost: {S.HOST}\r\nConnection: close\r\nContent-Length: {total}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            _send_all(sock, total)
        elif direction == "form":
            length = len(FORM_HEAD) + total + len(FORM_TAIL)
            sock.sendall(
                f"POST /upload HTTP/1.1\r\nHost: {S.HOST}\r\nConnection: close\r\nContent-Length: {length}\r\n"
                f"Content-Type: multipart/form-data; boundary=bench\r\n\r\n".encode() + FORM_HEAD
            )
            _send_all(sock, total)
            sock.sendall(FORM_TAIL)
        else:
            sock.sendall(f"GET /download?bytes={total} HTTP/1.1\r\nHost: {S.HOST}\r\nConnection: close\r\n\r\n".encode())
        status, body = _read_response(sock)
        seconds = time.monotonic() - began
    ok = status == 200 and (direction != "download" or body == total)
    return {"status": status, "ok": ok, "seconds": seconds, "mb_per_s": total / 2**20 / seconds, "body": body}


def c_bulk(plan: Plan, name: str, ctx: "Context", out: Path) -> dict[str, Any]:
    system = ctx.system(name)
    result: dict[str, Any] = {"system": name, "bytes": plan.c_bytes}
    try:
        if isinstance(system, S.HAProxy):
            system.start(1)
            baseline = settle(system.hub_pid)
        else:
            baseline = warm_hub(system)
            system.start_workers(1)
            system.wait_workers(1, 30)
            baseline = settle(system.hub_pid)
        result["baseline_rss"] = baseline
        for direction in ("upload", "download", "form"):
            if direction != "download" and name.startswith("original"):
                result[direction] = {"skipped": "the original hub does not forward request bodies"}
                continue
            size = plan.c_form_bytes if direction == "form" else plan.c_bytes
            sampler = Sampler(system.hub_pid)
            try:
                r = transfer(system.port, direction, size, timeout=120)
            except OSError as e:
                r = {"ok": False, "error": repr(e)}
            peak = sampler.stop()
            r["peak_rss"] = peak
            r["growth"] = peak - baseline
            result[direction] = r
            log(f"C: {name}: {size / 2**20:.0f} MiB {direction}: status {r.get('status')} "
                f"{r.get('mb_per_s', 0):.0f} MiB/s, hub RSS +{r['growth'] / 2**20:.1f} MiB")
            if name != "haproxy-lc" and not isinstance(system, S.HAProxy):
                system.wait_workers(1, 30)  # a one-job-per-connection worker reconnects
    finally:
        system.cleanup()
    return result


def workload_c(plan: Plan, names: list[str], ctx: "Context") -> dict[str, Any]:
    out = ctx.out / "C"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"queued": [], "idle": [], "bulk": [], "plan": {
        "queued": plan.c_queued, "idle": plan.c_idle, "bytes": plan.c_bytes, "form_bytes": plan.c_form_bytes,
        "drain_workers": plan.c_drain_workers}}
    for name in [n for n in names if n in plan.c_queue_systems]:
        results["queued"].append(guard(lambda: c_queue_and_drain(plan, name, ctx, out), name))
    for name in [n for n in names if n in ("pothead", "original-d0")]:
        results["idle"].append(guard(lambda: c_idle_connections(plan, name, ctx, out), name))
    for name in [n for n in names if n in ("pothead", "original-d0", "haproxy-lc")]:
        results["bulk"].append(guard(lambda: c_bulk(plan, name, ctx, out), name))
    return results


def guard(fn: Callable[[], dict[str, Any]], name: str) -> dict[str, Any]:
    """One measurement's failure is recorded, not fatal to the run."""
    try:
        return fn()
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        log(f"!! {name}: {type(e).__name__}: {e}")
        return {"system": name, "error": f"{type(e).__name__}: {e}"}


# -- the run ----------------------------------------------------------------------------------------


class Context:
    def __init__(self, out: Path, reference_python: str | None, seed: int) -> None:
        self.out = out
        self.reference_python = reference_python
        self.seed = seed
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def system(self, name: str) -> S.System:
        return S.BY_NAME[name](self.logs, self.reference_python)


def command_version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def versions(ctx: Context) -> dict[str, str]:
    import twisted

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=S.REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "pothead", "twisted"], cwd=S.REPO,
                           capture_output=True, text=True).stdout.strip()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    v = {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pothead git rev": rev + (" + uncommitted changes under pothead/" if dirty else ""),
        "haproxy": command_version(["haproxy", "-v"]),
        "wrk": command_version(["wrk", "-v"]),
        "kernel": platform.release(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
    }
    try:
        v.update(S.Original(ctx.logs, ctx.reference_python).versions())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        v["original POTHEAD"] = f"unavailable ({e})"
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="a smoke run (~3 minutes)")
    parser.add_argument("--reference-python", default=str(S.REPO / ".venv-reference" / "bin" / "python"))
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--systems", default=",".join(cls.name for cls in S.ALL))
    parser.add_argument("--out", default=str(BENCH / "out"))
    parser.add_argument("--results", default=str(BENCH / "RESULTS.md"), help="the report to write")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    plan = QUICK if args.quick else FULL
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in S.BY_NAME]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(S.BY_NAME)}")
    if not Path(args.reference_python).exists():
        log(f"no original POTHEAD interpreter at {args.reference_python}: skipping it (make reference)")
        names = [n for n in names if not n.startswith("original")]
    out = Path(args.out)
    ctx = Context(out, args.reference_python, args.seed)

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    began = time.time()
    results: dict[str, Any] = {
        "quick": args.quick,
        "command": "make bench-quick" if args.quick else "make bench",
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(ctx),
        "loadavg_start": os.getloadavg(),
        "systems": {n: S.BY_NAME[n].label for n in names},
        "seed": args.seed,
        "out": os.path.relpath(out, S.REPO),
    }
    log("versions: " + "; ".join(f"{k} {v}" for k, v in results["versions"].items()))
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    try:
        if "A" in workloads:
            results["A"] = workload_a(plan, names, ctx)
        if "B" in workloads:
            results["B"] = workload_b(plan, names, ctx)
        if "C" in workloads:
            results["C"] = workload_c(plan, names, ctx)
    finally:
        S.PROCS.stop_all()
        results["seconds"] = time.time() - began
        results["loadavg_end"] = os.getloadavg()
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    import report

    report.write(results, Path(args.results), Path(args.results).parent / "plots")
    log(f"wrote {args.results} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
