"""
Workload A's traces and their ideal: a zero-overhead central FIFO queue
feeding ``c`` identical servers (M/G/c), simulated exactly.

Everything here is pure Python and deterministic (``random.Random(seed)``; no
numpy), so the unit tests run anywhere and every system replays exactly the
same arrivals and job sizes.

* :func:`make_trace` -- Poisson arrivals and job sizes (lognormal or Pareto),
  the arrival rate chosen so the trace's *realized* offered load is exactly
  ``load`` (rate = load * servers / mean size of this trace);
* :func:`simulate_fifo` -- the ideal's per-job waits and latencies;
* :func:`percentile` -- the one percentile definition used for every system.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

#: Workload A's job-size distributions: mean 100 ms.
MEAN_SIZE = 0.100
LOGNORMAL_SIGMA = 1.0
#: Pareto shape: alpha = 2 has a finite mean and an infinite variance (heavy tail).
PARETO_ALPHA = 2.0
#: Largest Pareto job (50 x the mean) so a run stays bounded in time.
PARETO_CAP = 5.0


@dataclass
class Trace:
    """Arrival offsets (seconds from the trace's start, ascending) and job sizes (seconds)."""

    arrivals: list[float]
    sizes: list[float]
    servers: int
    load: float
    distribution: str
    seed: int
    rate: float = 0.0
    meta: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrivals)

    def to_json(self) -> dict[str, object]:
        return {
            "arrivals": self.arrivals,
            "sizes": self.sizes,
            "servers": self.servers,
            "load": self.load,
            "distribution": self.distribution,
            "seed": self.seed,
            "rate": self.rate,
        }


def job_sizes(distribution: str, count: int, rng: random.Random, mean: float = MEAN_SIZE) -> list[float]:
    """``count`` job sizes in seconds with the given mean."""
    if distribution == "lognormal":
        mu = math.log(mean) - LOGNORMAL_SIGMA**2 / 2
        return [rng.lognormvariate(mu, LOGNORMAL_SIGMA) for _ in range(count)]
    if distribution == "pareto":
        scale = mean * (PARETO_ALPHA - 1) / PARETO_ALPHA
        return [min(PARETO_CAP, scale * rng.paretovariate(PARETO_ALPHA)) for _ in range(count)]
    if distribution == "deterministic":
        return [mean] * count
    if distribution == "exponential":
        return [rng.expovariate(1.0 / mean) for _ in range(count)]
    raise ValueError(f"unknown distribution {distribution!r}")


def make_trace(
    distribution: str, load: float, count: int, *, servers: int = 4, seed: int = 1, mean: float = MEAN_SIZE
) -> Trace:
    """Poisson arrivals at ``load`` of ``servers`` x capacity, sizes from ``distribution``."""
    if not 0 < load:
        raise ValueError("load must be > 0")
    rng = random.Random(f"{seed}:{distribution}:{load}:{count}:{servers}")
    sizes = job_sizes(distribution, count, rng, mean)
    realized_mean = sum(sizes) / len(sizes)
    rate = load * servers / realized_mean
    t = 0.0
    arrivals = []
    for _ in range(count):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return Trace(arrivals, sizes, servers, load, distribution, seed, rate, {"mean_size": realized_mean})


@dataclass
class Ideal:
    """Per job: start (seconds from the trace start), wait and latency (= wait + size)."""

    starts: list[float]
    waits: list[float]
    latencies: list[float]

    @property
    def finish(self) -> float:
        return max(s + (lat - w) for s, w, lat in zip(self.starts, self.waits, self.latencies)) if self.starts else 0.0


def simulate_fifo(arrivals: Sequence[float], sizes: Sequence[float], servers: int) -> Ideal:
    """
    The exact schedule of one central FIFO queue with ``servers`` servers and
    no overhead: jobs start in arrival order, each on the server that frees up
    first (an idle server takes an arriving job at once).
    """
    if servers < 1:
        raise ValueError("servers must be >= 1")
    if len(arrivals) != len(sizes):
        raise ValueError("arrivals and sizes differ in length")
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    free = [0.0] * servers  # min-heap of the times each server becomes free
    starts = [0.0] * len(arrivals)
    waits = [0.0] * len(arrivals)
    latencies = [0.0] * len(arrivals)
    for i in order:
        earliest = heapq.heappop(free)
        start = max(arrivals[i], earliest)
        end = start + sizes[i]
        heapq.heappush(free, end)
        starts[i] = start
        waits[i] = start - arrivals[i]
        latencies[i] = end - arrivals[i]
    return Ideal(starts, waits, latencies)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between order statistics
    (numpy's default); ``inf`` values (requests that never completed) sort last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(math.floor(position))
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    if fraction == 0 or ordered[low] == ordered[high]:
        return ordered[low]
    if math.isinf(ordered[high]):
        return math.inf
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def erlang_c(servers: int, offered: float) -> float:
    """Probability of waiting in M/M/c with ``offered`` = lambda/mu Erlangs (< servers)."""
    if offered >= servers:
        return 1.0
    term = 1.0
    total = 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers
    tail = last * servers / (servers - offered)
    return tail / (total + tail)


if __name__ == "__main__":  # a quick look: python bench/simulate.py
    for dist in ("lognormal", "pareto"):
        for load in (0.5, 0.8, 0.95):
            trace = make_trace(dist, load, 2000)
            ideal = simulate_fifo(trace.arrivals, trace.sizes, trace.servers)
            print(
                f"{dist:9} {load:4.0%}: {len(trace)} jobs over {trace.arrivals[-1]:6.1f}s, rate {trace.rate:5.1f}/s, "
                f"p50 {percentile(ideal.latencies, 50) * 1000:6.1f} ms, p99 {percentile(ideal.latencies, 99) * 1000:7.1f} ms, "
                f"max size {max(trace.sizes):5.2f}s, finish {ideal.finish:6.1f}s"
            )
