"""The M/G/c simulation behind workload A's ideal (bench/simulate.py): pure, fast, no numpy."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import simulate  # noqa: E402
from simulate import erlang_c, make_trace, percentile, simulate_fifo  # noqa: E402

pytestmark = pytest.mark.no_reactor


def test_deterministic_sizes_give_exact_waits() -> None:
    # 2 servers, 1 s jobs, 5 jobs at t=0: starts 0,0,1,1,2 -> waits 0,0,1,1,2.
    ideal = simulate_fifo([0.0] * 5, [1.0] * 5, servers=2)
    assert ideal.waits == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert ideal.latencies == [1.0, 1.0, 2.0, 2.0, 3.0]
    assert ideal.finish == 3.0


def test_idle_server_takes_a_job_at_once_and_fifo_order_holds() -> None:
    # One server: a long job, then two short ones queue behind it in arrival order.
    ideal = simulate_fifo([0.0, 0.1, 0.2, 10.0], [1.0, 0.5, 0.5, 0.3], servers=1)
    assert ideal.starts == pytest.approx([0.0, 1.0, 1.5, 10.0])
    assert ideal.waits == pytest.approx([0.0, 0.9, 1.3, 0.0])


def test_unsorted_arrivals_are_served_in_arrival_order() -> None:
    ideal = simulate_fifo([0.2, 0.0, 0.1], [1.0, 1.0, 1.0], servers=1)
    assert ideal.starts == pytest.approx([2.0, 0.0, 1.0])


def test_below_capacity_deterministic_arrivals_never_wait() -> None:
    arrivals = [i * 0.3 for i in range(100)]
    ideal = simulate_fifo(arrivals, [1.0] * 100, servers=4)  # 4 servers, 1 s jobs every 0.3 s: load 0.83
    assert max(ideal.waits) == 0.0


def test_mm1_mean_wait_matches_theory() -> None:
    # M/M/1 at rho = 0.5: mean wait in queue = rho / (mu - lambda) = 0.5 / (10 - 5) s = 0.1 s.
    trace = make_trace("exponential", 0.5, 40_000, servers=1, seed=7)
    ideal = simulate_fifo(trace.arrivals, trace.sizes, 1)
    mean_wait = sum(ideal.waits) / len(ideal.waits)
    assert mean_wait == pytest.approx(0.1, rel=0.1)


def test_mm4_probability_of_waiting_matches_erlang_c() -> None:
    trace = make_trace("exponential", 0.8, 40_000, servers=4, seed=3)
    ideal = simulate_fifo(trace.arrivals, trace.sizes, 4)
    waited = sum(1 for w in ideal.waits if w > 0) / len(ideal.waits)
    assert waited == pytest.approx(erlang_c(4, 3.2), abs=0.03)


def test_traces_are_deterministic_and_at_the_requested_load() -> None:
    a = make_trace("lognormal", 0.8, 2000, seed=1)
    b = make_trace("lognormal", 0.8, 2000, seed=1)
    assert a.arrivals == b.arrivals and a.sizes == b.sizes
    assert make_trace("lognormal", 0.8, 2000, seed=2).sizes != a.sizes
    assert a.arrivals == sorted(a.arrivals)
    # rate x mean size = load x servers, exactly for the realized trace
    assert a.rate * (sum(a.sizes) / len(a.sizes)) == pytest.approx(0.8 * 4)
    # the mean of the distribution is ~100 ms
    assert sum(a.sizes) / len(a.sizes) == pytest.approx(simulate.MEAN_SIZE, rel=0.1)
    pareto = make_trace("pareto", 0.95, 2000, seed=1)
    assert min(pareto.sizes) >= simulate.MEAN_SIZE / 2 * 0.999
    assert max(pareto.sizes) <= simulate.PARETO_CAP


def test_percentile_matches_linear_interpolation_and_handles_incomplete() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, math.inf], 99) == math.inf
    assert percentile([1.0, 2.0, 3.0, math.inf], 50) == 2.5
