"""
Benchmark: ``--poll-jobs`` with ``wait_for_idle_cpus(1)`` against ``--threads 1, 2, 4, 8``.

    .venv/bin/python bench/gating.py            # ~4 minutes, writes bench/RESULTS.md
    .venv/bin/python bench/gating.py --quick    # ~1.5 minutes, smaller trace

CPU-bound jobs (``bench/gating_app.py``: sha256 over a 1 MiB buffer, a fixed
number of rounds calibrated here to ~0.2 s of CPU, GIL released so one
worker process can use every core) are offered open loop -- a seeded Poisson
trace at ``--load`` (default 1.5) times what the machine's cores can serve --
for ``--duration`` seconds, through a real ``twistd pothead-hub`` and ONE
``twistd pothead-worker`` process, for every configuration in turn, all on
loopback.  The same trace is replayed for every configuration.

Reported per configuration:

* throughput: responses completed per second over the steady part of the
  offer window (after ``--warmup`` seconds, while the queue was never empty);
* p50/p99 latency: completion minus *scheduled* arrival, over every job of
  the trace (jobs still unanswered when the drain limit ran out count as
  infinitely late, so a p99 shown as ">X" means more than 1% were cut off);
* the worker's concurrency over time (from each job's start/end, as reported
  by the app): time-weighted mean, max, and share of the steady window with
  at least 2 jobs running;
* job wall time (mean): how long one job took once started (contention);
* other load: CPU used on the machine by processes other than the hub, the
  worker and this client, in cores, averaged over the steady window -- the
  machine may be shared, and this says how much.

Throughputs are also given as a ratio to the best fixed ``--threads``
setting; the gate's target is >= 0.90 without being told the core count.

Processes are stopped by PID (SIGTERM, then SIGKILL) in ``finally`` blocks.
The raw per-job data of the last full run goes to bench/out/gating-last.json
(of a partial or investigative run: gating-last-partial.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
RESULTS = HERE / "RESULTS.md"
RAW = HERE / "out" / "gating-last.json"  # bench/out/ is git-ignored
HEADING = "## Gating (--poll-jobs)"
JOB_CPU_TARGET = 0.2

sys.path.insert(0, str(HERE))
import gating_app  # noqa: E402  (the same job code the worker runs)


# -- helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def stop_process(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM this PID, then SIGKILL it if it does not exit."""
    if process is None or process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def calibrate_rounds(target: float = JOB_CPU_TARGET) -> tuple[int, float]:
    """Rounds of 1 MiB sha256 that take ``target`` s of CPU (single thread, best of 5)."""
    probe = 40
    per_round = math.inf
    for _ in range(5):
        t0 = time.thread_time()
        gating_app.hash_job(probe)
        per_round = min(per_round, (time.thread_time() - t0) / probe)
    return max(1, round(target / per_round)), per_round


def gil_check(rounds: int, jobs_per_thread: int = 3) -> dict[str, float]:
    """Jobs/s with 1 and 2 threads in this process: the job really runs in parallel."""
    rates = {}
    for n in (1, 2):
        threads = [
            threading.Thread(target=lambda: [gating_app.hash_job(rounds) for _ in range(jobs_per_thread)])
            for _ in range(n)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[str(n)] = n * jobs_per_thread / (time.perf_counter() - t0)
    return rates


def poisson_trace(rate: float, duration: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return arrivals
        arrivals.append(t)


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0)


def process_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_quiet(budget: float, threshold: float = 0.2, span: float = 3.0) -> float:
    """Wait (at most ``budget`` s) until the machine has been nearly idle for ``span`` s; return the wait."""
    started = time.monotonic()
    while True:
        before = busy_cpu_seconds()
        time.sleep(span)
        if (busy_cpu_seconds() - before) / span < threshold or time.monotonic() - started >= budget:
            return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; math.inf entries sort last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# -- one configuration ---------------------------------------------------------------------


@dataclass
class Config:
    name: str
    worker_args: list[str]
    app: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    index: int
    scheduled: float  # absolute wall time
    sent: float = math.nan
    completed: float = math.nan
    status: int = 0
    report: dict | None = None
    error: str | None = None


async def fetch(port: int, job: Job) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        job.error = f"connect: {e}"
        return
    try:
        job.sent = time.time()
        writer.write(f"GET /job/{job.index} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        job.completed = time.time()
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        job.status = int(match.group(1)) if match else 0
        start, end = body.find(b"{"), body.rfind(b"}")
        if job.status == 200 and start >= 0:
            job.report = json.loads(body[start : end + 1])
    except (OSError, ValueError) as e:
        job.error = repr(e)
    finally:
        writer.close()


async def offer(port: int, trace: list[float], t0: float, drain_until: float) -> list[Job]:
    jobs = [Job(i, t0 + at) for i, at in enumerate(trace)]
    tasks = []
    for job in jobs:
        delay = job.scheduled - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fetch(port, job)))
    remaining = drain_until - time.time()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return jobs


def run_config(config: Config, trace: list[float], args: argparse.Namespace, rounds: int, logdir: Path) -> dict:
    consumer, workers = free_port(), free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
        POTHEAD_BENCH_ROUNDS=str(rounds),
        **config.env,
    )
    hub = worker = None
    slug = re.sub(r"[^a-z0-9]+", "-", config.name.lower()).strip("-")
    hub_log = open(logdir / f"{slug}-hub.log", "wb")
    worker_log = open(logdir / f"{slug}-worker.log", "wb")
    try:
        hub = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pothead-hub",
             f"--listen=tcp:{consumer}:interface=127.0.0.1:backlog=1024",
             f"--workers=tcp:{workers}:interface=127.0.0.1:backlog=1024",
             "--consumer-timeout=0", "--drain-timeout=2"],
            stdout=hub_log, stderr=subprocess.STDOUT, env=env, cwd=logdir,
        )
        wait_port(consumer)
        worker = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pothead-worker", f"--connect=127.0.0.1:{workers}",
             "--drain-timeout=2", *config.worker_args, config.app],
            stdout=worker_log, stderr=subprocess.STDOUT, env=env, cwd=logdir,
        )
        # Warm up: one job through the whole path (imports, first connection).
        deadline = time.monotonic() + 30
        while True:
            warm = Job(-1, time.time())
            asyncio.run(fetch(consumer, warm))
            if warm.status == 200:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{config.name}: worker did not serve a warm-up job ({warm.status} {warm.error})")
            time.sleep(0.2)
        time.sleep(1.0)  # let the gate's wait-time average and the machine settle

        pids = [hub.pid, worker.pid, os.getpid()]
        t0 = time.time() + 0.2
        window = (t0 + args.warmup, t0 + args.duration)
        cpu_marks: dict[str, tuple[float, float]] = {}

        def mark(name: str, at: float) -> None:
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            cpu_marks[name] = (busy_cpu_seconds(), process_cpu_seconds(pids))

        def marks() -> None:
            mark("start", window[0])
            mark("end", window[1])

        marker = threading.Thread(target=marks, daemon=True)
        marker.start()
        jobs = asyncio.run(offer(consumer, trace, t0, t0 + args.duration + args.drain))
        marker.join()
    finally:
        stop_process(worker)
        stop_process(hub)
        hub_log.close()
        worker_log.close()

    (busy0, ours0), (busy1, ours1) = cpu_marks["start"], cpu_marks["end"]
    span = window[1] - window[0]
    other_load = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / span)
    ok = [j for j in jobs if j.status == 200 and j.report is not None]
    failed = [j for j in jobs if not math.isnan(j.completed) and j.status != 200]
    completed_in_window = [j for j in ok if window[0] <= j.completed < window[1]]
    throughput = len(completed_in_window) / span
    latencies = [(j.completed - j.scheduled) if j in ok else math.inf for j in jobs]
    # Was the worker backlogged through the window?  Outstanding = arrived - completed.
    events = sorted([(j.scheduled, 1) for j in jobs] + [(j.completed, -1) for j in ok])
    level, min_backlog = 0, math.inf
    for at, delta in events:
        level += delta
        if window[0] <= at < window[1]:
            min_backlog = min(min_backlog, level)
    conc = concurrency([(j.report["start"], j.report["end"]) for j in ok], window)
    return {
        "name": config.name,
        "throughput": throughput,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "completed": len(ok),
        "offered": len(jobs),
        "failed": len(failed),
        "cut_off": sum(1 for j in jobs if math.isnan(j.completed)),
        "min_backlog": min_backlog,
        "job_wall": statistics.fmean(j.report["end"] - j.report["start"] for j in ok) if ok else math.nan,
        "job_cpu": statistics.fmean(j.report["cpu"] for j in ok) if ok else math.nan,
        "other_load": other_load,
        **conc,
        "jobs": [
            {"i": j.index, "scheduled": j.scheduled - t0, "completed": j.completed - t0, "status": j.status,
             **({"start": j.report["start"] - t0, "end": j.report["end"] - t0,
                 "concurrent": j.report["concurrent"], "granted": j.report["granted"]} if j.report else {})}
            for j in jobs
        ],
    }


def concurrency(intervals: list[tuple[float, float]], window: tuple[float, float]) -> dict:
    """Time-weighted concurrency inside ``window``, its max, share of time >= 2, per-second means."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level, weighted, at_least_2, peak = 0, 0.0, 0.0, 0
    seconds = [0.0] * max(1, math.ceil(window[1] - window[0]))

    def account(a: float, b: float, lvl: int) -> None:
        nonlocal weighted, at_least_2
        a, b = max(a, window[0]), min(b, window[1])
        if b <= a:
            return
        weighted += lvl * (b - a)
        if lvl >= 2:
            at_least_2 += b - a
        t = a
        while t < b:
            k = int(t - window[0])
            edge = min(b, window[0] + k + 1)
            seconds[min(k, len(seconds) - 1)] += lvl * (edge - t)
            t = edge

    last = -math.inf
    for at, delta in events:
        account(last, at, level)
        if last < window[0] <= at:
            peak = max(peak, level)  # the level the window starts with
        last = at
        level += delta
        if window[0] <= at < window[1]:
            peak = max(peak, level)
    account(last, window[1], level)
    span = window[1] - window[0]
    return {
        "conc_mean": weighted / span,
        "conc_max": peak,
        "conc_ge2": at_least_2 / span,
        "conc_per_second": [round(v, 2) for v in seconds],
    }


# -- report ------------------------------------------------------------------------------------


def fmt_latency(value: float, cap: float) -> str:
    return f">{cap:.0f}" if math.isinf(value) else f"{value:.1f}"


def table(results: list[dict], best: float, cap: float) -> str:
    lines = [
        "| configuration | jobs/s | vs best fixed | p50 s | p99 s | conc. mean | conc. max | time ≥2 jobs "
        "| job wall s | done/offered | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['throughput']:.2f} | {r['throughput'] / best:.2f} | {fmt_latency(r['p50'], cap)} "
            f"| {fmt_latency(r['p99'], cap)} | {r['conc_mean']:.2f} | {r['conc_max']} | {100 * r['conc_ge2']:.0f}% "
            f"| {r['job_wall']:.2f} | {r['completed']}/{r['offered']} | {r['other_load']:.2f} |"
        )
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Add or replace our section of bench/RESULTS.md (re-read right before writing; others write there too)."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = text.rstrip("\n") + "\n\n"
    if pattern.search(current):
        updated = pattern.sub(lambda _: section, current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + section
    tmp = RESULTS.with_suffix(".md.tmp-gating")
    tmp.write_text(updated.rstrip("\n") + "\n")
    os.replace(tmp, RESULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short trace (duration 8 s, drain 20 s)")
    parser.add_argument("--duration", type=float, help="seconds of offered load [15; quick: 8]")
    parser.add_argument("--warmup", type=float, help="seconds excluded from the steady window [3; quick: 2]")
    parser.add_argument("--drain", type=float, help="seconds after the offer ends to wait for answers [30; quick: 20]")
    parser.add_argument("--load", type=float, default=1.5, help="offered load / capacity of all cores [1.5]")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--job-cpu", type=float, default=JOB_CPU_TARGET, help="CPU seconds per job [0.2]")
    parser.add_argument("--only", help="comma-separated configuration names (e.g. gate,threads-2)")
    parser.add_argument("--gate-variant", action="append", default=[], metavar="SPEC",
                        help="extra --poll-jobs configuration: wait_for_idle_cpus with POTHEAD_BENCH_GATE=SPEC "
                             "arguments, e.g. tolerance=0 (investigation)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="total seconds to spend waiting for the machine to be quiet before configurations [30]")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args()
    args.duration = args.duration or (8.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    args.drain = args.drain if args.drain is not None else (20.0 if args.quick else 30.0)

    cores = os.cpu_count() or 1
    rounds, per_round = calibrate_rounds(args.job_cpu)
    job_cpu = rounds * per_round
    gil = gil_check(rounds)
    rate = args.load * cores / job_cpu
    trace = poisson_trace(rate, args.duration, args.seed)
    print(f"{cores} cores; job = {rounds} x sha256(1 MiB) = {job_cpu:.3f} s CPU; "
          f"in-process 1 vs 2 threads: {gil['1']:.2f} vs {gil['2']:.2f} jobs/s ({gil['2'] / gil['1']:.2f}x); "
          f"offering {len(trace)} jobs over {args.duration:.0f} s ({rate:.1f}/s, {args.load}x capacity)", flush=True)

    configs = [Config("--poll-jobs + wait_for_idle_cpus(1)", ["--poll-jobs"], "gating_app:gated_app")]
    configs += [Config(f"--threads {n}", [f"--threads={n}"], "gating_app:fixed_app") for n in (1, 2, 4, 8)]
    configs += [Config(f"--poll-jobs, gate {spec}", ["--poll-jobs"], "gating_app:gated_app",
                       {"POTHEAD_BENCH_GATE": spec}) for spec in args.gate_variant]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        short = {"gate": configs[0].name, **{f"threads-{n}": f"--threads {n}" for n in (1, 2, 4, 8)}}
        names = {short.get(w, w) for w in wanted}
        configs = [c for c in configs if c.name in names or c.env]  # --gate-variant ones always run

    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="pothead-bench-gating-") as tmp:
        quiet_budget = args.quiet_wait
        for config in configs:
            # The machine may be shared: start each configuration when it is quiet (bounded wait).
            waited = wait_quiet(quiet_budget) if quiet_budget > 0 else 0.0
            quiet_budget = max(0.0, quiet_budget - waited)
            r = run_config(config, trace, args, rounds, Path(tmp))
            results.append(r)
            print(f"  {r['name']:<40} {r['throughput']:5.2f} jobs/s  p50 {fmt_latency(r['p50'], args.drain)} s  "
                  f"p99 {fmt_latency(r['p99'], args.drain)} s  conc mean {r['conc_mean']:.2f} max {r['conc_max']} "
                  f"(>=2: {100 * r['conc_ge2']:.0f}%)  job wall {r['job_wall']:.2f} s  "
                  f"done {r['completed']}/{r['offered']}  min backlog {r['min_backlog']}  "
                  f"other load {r['other_load']:.2f}", flush=True)
    elapsed = time.time() - started

    fixed = [r for r in results if r["name"].startswith("--threads")]
    best = max((r["throughput"] for r in fixed), default=max(r["throughput"] for r in results))
    gate = next((r for r in results if r["name"] == configs[0].name and configs[0].name.startswith("--poll")), None)
    partial = bool(args.no_write or args.only or args.gate_variant)
    raw = RAW.with_name("gating-last-partial.json") if partial else RAW
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({"args": vars(args), "rounds": rounds, "job_cpu": job_cpu, "gil": gil,
                               "results": results}, indent=1, default=str))
    rendered = table(results, best, args.drain)
    print()
    print(rendered)
    verdict = ""
    if gate is not None and fixed:
        ratio = gate["throughput"] / best
        best_name = max(fixed, key=lambda r: r["throughput"])["name"]
        verdict = (f"Gate throughput / best fixed ({best_name}): **{ratio:.2f}** -- target >= 0.90 "
                   f"{'met' if ratio >= 0.90 else 'NOT met'}.")
        distorted = [r["name"] for r in (gate, max(fixed, key=lambda r: r["throughput"])) if r["other_load"] > 0.2]
        if distorted:
            verdict += (f" Distorted by other load on the machine during: {', '.join(distorted)} "
                        "(see the last column) -- rerun for a clean comparison.")
        starved = [r["name"] for r in results if r["min_backlog"] <= 0]
        if starved:
            verdict += f" Not backlogged throughout the window: {', '.join(starved)}."
        print("\n" + verdict.replace("**", ""))
    if partial:
        print("(partial or investigative run: bench/RESULTS.md not written)")
        return 0
    command = "cd /work/main && .venv/bin/python bench/gating.py" + (" --quick" if args.quick else "")
    extra = [a for a in sys.argv[1:] if a != "--quick"]
    if extra:
        command += " " + " ".join(shlex.quote(a) for a in extra)
    max_other = max(r["other_load"] for r in results)
    section = f"""{HEADING}

Command (also `make bench-gating`):

    {command}

Run {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, {elapsed:.0f} s, on {cores} cores.
Each job: {rounds} x sha256 over a 1 MiB buffer = {job_cpu:.3f} s of CPU (GIL released; in one process 2 threads
did {gil['2'] / gil['1']:.2f}x the jobs/s of 1 thread just before the run).  Open loop: the same seeded Poisson
trace (seed {args.seed}) of {len(trace)} jobs over {args.duration:.0f} s = {rate:.1f} jobs/s, {args.load}x what
{cores} cores can serve, through one `twistd pothead-hub` and ONE `twistd pothead-worker` per configuration
(loopback).  jobs/s: responses per second over the steady window ({args.warmup:.0f}-{args.duration:.0f} s,
backlogged throughout); latency: completion minus scheduled arrival over all jobs (">{args.drain:.0f}": more than
1% still unanswered {args.drain:.0f} s after the offer ended); concurrency: jobs running in the worker (from
the app's start/end times) over the steady window; other load: CPU used by other processes on the machine
during the window (up to {max_other:.2f} cores in this run{' -- the machine was shared, treat absolute numbers as noisy, ratios as the result' if max_other > 0.15 else ''}).

{rendered}

{verdict}

The gate row is `app.wait_for_slot = pothead.gating.wait_for_idle_cpus(1)` with its defaults, as an app would
set it (max_concurrent = ceil(2 x cores / 1) = {2 * cores} here; tolerance 0.1; readings kept across waits; a
level the readings admitted is refilled when a job ends unless our jobs are starved -- see the README's Gating
section).  Before the tolerance, the kept readings and the level refill, it ran one job at a time on this
benchmark: 0.53x the best fixed setting.  Investigation aids: `bench/gating_sim.py` replays the same worker and
gate deterministically (fake CPU readers with /proc/stat's 10 ms ticks, injected clock; also with other load:
`--background`, `--pattern`), and `bench/gating.py --gate-variant SPEC` runs the gate with other arguments
(e.g. `tolerance=0`) next to the configurations above.
"""
    write_section(section)
    print(f"\nwrote the '{HEADING[3:]}' section of {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
