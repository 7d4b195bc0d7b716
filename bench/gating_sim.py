"""
Deterministic simulation of a ``--poll-jobs`` worker and its CPU gate (investigation aid
for bench/gating.py; no real CPU, no sleeping, no noise from other processes).

    .venv/bin/python bench/gating_sim.py [--job-cpu 0.2] [--background 0] [--seconds 60]

The gate under test is the real :class:`pothead.gating.CpuGate` (as ``wait_for_idle_cpus``
builds it, or with other arguments: ``--gate SPEC``, bench/gating_app.py's syntax), driven
through its injected clock, sleep and CPU readers:

* machine: ``--cores`` CPUs shared processor-style between the running jobs and
  ``--background`` cores' worth of other load (``--pattern ON:OFF``: switching on and
  off); the readers return cumulative idle, busy and own (our jobs') CPU-seconds rounded
  down to /proc/stat's 10 ms ticks, like psutil's;
* worker: like pothead/worker/polling.py, the poller asks ``wait_for_slot`` again as
  soon as it gets a grant; each grant opens a connection and the request arrives
  ``--connect-ms`` later (``request_received``), the job needs ``--job-cpu``
  CPU-seconds, and its end calls ``done()``.  Jobs are always queued (saturated).

``--threads N`` is simulated the same way with N slots that never wait for a gate
(keep-alive: no connect delay between jobs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Machine:
    def __init__(self, cores: float, background: float) -> None:
        self.cores = cores
        self.background = background
        self.now = 0.0
        self.idle = 0.0  # cumulative idle CPU-seconds
        self.busy = 0.0  # cumulative busy CPU-seconds (ours and others')
        self.own = 0.0  # cumulative CPU-seconds of our jobs
        self.pattern: tuple[float, float] | None = None  # (seconds on, seconds off) of the background
        self.jobs: dict[object, float] = {}  # job -> CPU-seconds still needed
        self.area = 0.0  # integral of running jobs over time

    def bg(self) -> float:
        if self.pattern is None:
            return self.background
        on, off = self.pattern
        return self.background if (self.now % (on + off)) < on else 0.0

    def next_change(self) -> float:
        if self.pattern is None:
            return math.inf
        on, off = self.pattern
        phase = self.now % (on + off)
        return self.now + (on - phase if phase < on else on + off - phase)

    def share(self) -> float:
        """CPU each running job gets now."""
        demand = len(self.jobs) + self.bg()
        return 1.0 if demand <= self.cores else self.cores / demand

    def next_completion(self) -> tuple[float, object | None]:
        if not self.jobs:
            return math.inf, None
        job = min(self.jobs, key=self.jobs.__getitem__)
        return self.now + self.jobs[job] / self.share(), job

    def advance(self, to: float) -> None:
        while self.next_change() < to:  # the background switches on or off on the way
            self._advance(self.next_change() + 1e-12)
        self._advance(to)

    def _advance(self, to: float) -> None:
        dt = to - self.now
        if dt <= 0:
            return
        share = self.share()
        for job in self.jobs:
            self.jobs[job] -= share * dt
        self.own += share * len(self.jobs) * dt
        busy = min(self.cores, len(self.jobs) + self.bg())
        self.busy += busy * dt
        self.idle += (self.cores - busy) * dt
        self.area += len(self.jobs) * dt
        self.now = to

    # readers, as psutil sees /proc/stat: whole ticks of 10 ms
    def read_idle(self) -> float:
        return math.floor(self.idle * 100) / 100

    def read_used(self) -> float:
        return math.floor(self.busy * 100) / 100

    def read_own(self) -> float:
        return math.floor(self.own * 100) / 100


class World:
    """The event loop: arrivals of requests on granted connections, job completions."""

    def __init__(self, machine: Machine, job_cpu: float, connect: float) -> None:
        self.m = machine
        self.job_cpu = job_cpu
        self.connect = connect
        self.arrivals: list[tuple[float, object]] = []  # (time, grant)
        self.grants: dict[object, object] = {}  # job -> grant
        self.completed = 0

    def run_until(self, target: float) -> None:
        """Advance to ``target``, stopping early after the first event (it may wake the gate)."""
        while True:
            done_at, job = self.m.next_completion()
            arrive_at = min((t for t, _ in self.arrivals), default=math.inf)
            at = min(done_at, arrive_at)
            if at > target:
                self.m.advance(target)
                return
            self.m.advance(at)
            if done_at <= arrive_at:
                del self.m.jobs[job]
                self.completed += 1
                grant = self.grants.pop(job)
                if grant is not None:
                    grant.done()
            else:
                index = min(range(len(self.arrivals)), key=lambda i: self.arrivals[i][0])
                _, grant = self.arrivals.pop(index)
                if grant is not None:
                    grant.request_received({})
                job = object()
                self.m.jobs[job] = self.job_cpu
                self.grants[job] = grant
            return

    def sleep(self, seconds: float) -> None:
        self.run_until(self.m.now + max(seconds, 1e-9))


def machine_for(args: argparse.Namespace) -> Machine:
    machine = Machine(args.cores, args.background)
    if args.pattern:
        on, off = (float(x) for x in args.pattern.split(":"))
        machine.pattern = (on, off)
    return machine


def simulate_gate(make_gate, args: argparse.Namespace, spec: str) -> dict:
    machine = machine_for(args)
    world = World(machine, args.job_cpu, args.connect_ms / 1000)
    gate = make_gate(
        read_idle=machine.read_idle,
        read_used=machine.read_used,
        read_own=machine.read_own,
        cpu_count=args.cores,
        quota=math.inf,
        cpu_promised=0.0,
        clock=lambda: machine.now,
        sleep=world.sleep,
    )
    end = args.seconds
    granted_at_most = 0
    while machine.now < end:
        grant = gate.wait_for_slot(lambda: machine.now >= end)
        if getattr(grant, "halted", False):
            break
        world.arrivals.append((machine.now + world.connect, grant))
        granted_at_most = max(granted_at_most, gate.granted)
    return {"jobs_per_s": world.completed / machine.now, "conc_mean": machine.area / machine.now,
            "max_granted": granted_at_most, "level": gate.level}


def simulate_threads(n: int, args: argparse.Namespace) -> dict:
    machine = machine_for(args)
    world = World(machine, args.job_cpu, 0.0)
    for _ in range(n):
        world.arrivals.append((0.0, None))
    while machine.now < args.seconds:
        before = world.completed
        world.run_until(args.seconds)
        for _ in range(world.completed - before):
            world.arrivals.append((machine.now, None))  # keep-alive: the next job at once
    return {"jobs_per_s": world.completed / machine.now, "conc_mean": machine.area / machine.now, "max_granted": n}


def gate_factory(spec: str):
    """'' -> CpuGate(1) as wait_for_idle_cpus(1) makes it; else a POTHEAD_BENCH_GATE spec (bench/gating_app.py)."""
    os.environ["POTHEAD_BENCH_GATE"] = spec
    os.environ.pop("POTHEAD_BENCH_GATE_TRACE", None)
    import gating_app

    parsed = gating_app._gate_spec(spec)

    def make(**readers):
        return gating_app._make_gate(*parsed, **readers)

    return make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=float, default=2)
    parser.add_argument("--background", type=float, default=0.0, help="cores of other load [0]")
    parser.add_argument("--pattern", help="ON:OFF seconds: the background load switches on and off [constant]")
    parser.add_argument("--job-cpu", type=float, default=0.2)
    parser.add_argument("--connect-ms", type=float, default=3.0, help="grant -> request arrival [3]")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gate", action="append", default=[], metavar="SPEC",
                        help="gate variants (POTHEAD_BENCH_GATE syntax; '' = wait_for_idle_cpus(1)) [several]")
    args = parser.parse_args()
    specs = args.gate or ["", "tolerance=0", "inertia=0.3", "inertia=0", "required=1.5"]
    rows = [(f"--threads {n}", simulate_threads(n, args)) for n in (1, 2, 4, 8)]
    best = max(r["jobs_per_s"] for _, r in rows)
    rows += [(f"gate {spec or 'wait_for_idle_cpus(1)'}", simulate_gate(gate_factory(spec), args, spec)) for spec in specs]
    print(f"{args.cores:g} cores, background {args.background:g} cores{' ' + args.pattern + ' s on:off' if args.pattern else ''}, jobs of {args.job_cpu:g} CPU-s, "
          f"connect {args.connect_ms:g} ms, {args.seconds:g} s simulated")
    for name, r in rows:
        print(f"  {name:<48} {r['jobs_per_s']:6.2f} jobs/s  {r['jobs_per_s'] / best:5.2f} of best fixed  "
              f"conc {r['conc_mean']:.2f}  max granted {r['max_granted']}" + (f"  level at end {r['level']}" if 'level' in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
