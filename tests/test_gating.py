"""
Gating: the gate maths with a fake clock and fake CPU/memory counters (no
sleeps, no real load), the cgroup parsers on real file contents, and a few
bounded smoke tests with real threads.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pothead.cgroups import (
    CgroupFileError,
    CgroupFS,
    parse_cfs_quota,
    parse_cpu_max,
    parse_cpu_stat_usage,
    parse_cpuacct_usage,
    parse_memory_limit_in_bytes,
    parse_memory_max,
    parse_memory_stat,
    parse_proc_cgroup,
)
from pothead.gating import (
    AllOf,
    CombinedGrant,
    CpuGate,
    Gate,
    Grant,
    MemoryGate,
    ReservationGrant,
    SmoothedRate,
    SystemResources,
    all_of,
    wait_for_free_memory,
    wait_for_idle_cpus,
    wait_for_resources,
)

# No test here touches the reactor; the thread tests are bounded well below 10 s.
pytestmark = [pytest.mark.no_reactor, pytest.mark.timeout(10)]

GiB = 1024**3
MiB = 1024**2


def never() -> bool:
    return False


class FakeMachine:
    """
    A clock and cumulative CPU/memory counters that move only when the gate sleeps.

    ``idle``, ``used`` and ``own`` (the CPU this worker's jobs get) are rates
    in CPUs; ``available`` is bytes.  ``at(t, f)`` runs ``f`` once the clock
    passes ``start + t`` (from inside the gate's sleep, as another thread
    would).  Sleeping more than ``limit`` fake seconds fails the test instead
    of looping forever.
    """

    def __init__(
        self, idle: float = 0.0, used: float = 0.0, available: float = 0.0, own: float = 0.0, limit: float = 600.0
    ) -> None:
        self.start = self.now = 1000.0
        self.idle = idle
        self.used = used
        self.own = own
        self.available = available
        self.idle_total = 0.0
        self.used_total = 0.0
        self.own_total = 0.0
        self.idle_reads: list[float] = []
        self.sleeps: list[float] = []
        self.limit = limit
        self._events: list[tuple[float, Callable[[], None]]] = []

    @property
    def elapsed(self) -> float:
        return self.now - self.start

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the gate slept for no time: it would spin"
        self.sleeps.append(seconds)
        self.advance(seconds)
        assert self.elapsed < self.limit, "the gate never decided"

    def advance(self, seconds: float) -> None:
        self.idle_total += self.idle * seconds
        self.used_total += self.used * seconds
        self.own_total += self.own * seconds
        self.now += seconds
        due = [e for e in self._events if e[0] <= self.elapsed]
        self._events = [e for e in self._events if e[0] > self.elapsed]
        for _, action in due:
            action()

    def at(self, offset: float, action: Callable[[], None]) -> None:
        self._events.append((offset, action))

    def set(self, **rates: float) -> Callable[[], None]:
        def apply() -> None:
            for name, value in rates.items():
                setattr(self, name, value)

        return apply

    def halt_after(self, seconds: float) -> Callable[[], bool]:
        return lambda: self.elapsed >= seconds

    def read_idle(self) -> float:
        self.idle_reads.append(self.elapsed)
        return self.idle_total

    def read_used(self) -> float:
        return self.used_total

    def read_own(self) -> float:
        return self.own_total

    def read_available(self) -> float:
        return self.available


def cpu_gate(machine: FakeMachine, required: float = 1.0, **options: Any) -> CpuGate:
    options.setdefault("cpu_count", 8)
    options.setdefault("quota", math.inf)
    options.setdefault("cpu_promised", 0.0)
    return CpuGate(
        required,
        read_idle=machine.read_idle,
        read_used=machine.read_used,
        read_own=machine.read_own,
        clock=machine.clock,
        sleep=machine.sleep,
        **options,
    )


def memory_gate(machine: FakeMachine, required: int | str = GiB, **options: Any) -> MemoryGate:
    options.setdefault("total", 64 * GiB)
    return MemoryGate(
        required,
        read_available=machine.read_available,
        clock=machine.clock,
        sleep=machine.sleep,
        **options,
    )


def started(grant: Grant) -> dict[str, Any]:
    """Deliver a request to the grant's job; return its environ."""
    environ: dict[str, Any] = {}
    grant.request_received(environ)
    return environ


# -- CPU gate ---------------------------------------------------------------------------


def test_first_slot_is_granted_at_once_even_when_busy() -> None:
    machine = FakeMachine(idle=0.0, used=8.0)
    gate = cpu_gate(machine, 4)
    grant = gate(never)
    assert isinstance(grant, ReservationGrant) and not grant.halted
    assert machine.sleeps == []
    assert gate.granted == 1
    assert gate.reserved_cpus == 4


def test_second_slot_waits_while_busy_and_needs_more_than_one_idle_reading() -> None:
    machine = FakeMachine(idle=0.0)
    gate = cpu_gate(machine, 4, inertia=0.7)
    started(gate(never))
    rose: list[float] = []

    def rise() -> None:
        rose.append(machine.elapsed)
        machine.idle = 8.0

    machine.at(10.0, rise)
    second = gate(machine.halt_after(60))
    assert not second.halted and gate.granted == 2
    # Smoothing: 0.3 * 8 = 2.4 < 4 after the first idle reading, 4.08 after the second.
    assert len([t for t in machine.idle_reads if t > rose[0]]) == 2


def test_a_brief_idle_blip_does_not_open_the_gate() -> None:
    machine = FakeMachine(idle=0.0)
    gate = cpu_gate(machine, 4, inertia=0.7)
    started(gate(never))
    interval = gate.poll_interval()
    machine.at(1.0, machine.set(idle=8.0))
    machine.at(1.0 + interval, machine.set(idle=0.0))
    assert gate(machine.halt_after(5)).halted
    assert gate.granted == 1


def test_without_inertia_one_idle_reading_is_enough() -> None:
    machine = FakeMachine(idle=8.0)
    gate = cpu_gate(machine, 4, inertia=0.0)
    started(gate(never))
    reads = len(machine.idle_reads)
    assert not gate(never).halted
    assert len(machine.idle_reads) - reads == 2  # the baseline, then one sample


def test_readings_are_kept_across_waits_until_a_job_starts() -> None:
    machine = FakeMachine(idle=8.0)
    gate = cpu_gate(machine, 2, inertia=0.7)
    started(gate(never))
    second = gate(never)
    assert len(machine.idle_reads) == 2  # a baseline, then one sample
    reads, slept = len(machine.idle_reads), len(machine.sleeps)
    # No job started or ended since: the readings still hold, and the second
    # job's reservation covers it (8 - 2 >= 0.9 * 2 * 1.3).
    assert not gate(never).halted
    assert (len(machine.idle_reads), len(machine.sleeps)) == (reads, slept)
    # A job start makes them stale: re-read at once (a new baseline, no sleep
    # first), then one fresh sample an interval later.
    began = machine.elapsed
    started(second)
    assert not gate(never).halted
    assert machine.idle_reads[reads:] == [began, pytest.approx(began + gate.poll_interval())]


def test_a_fresh_reading_after_a_job_ends_replaces_the_smoothed_value() -> None:
    machine = FakeMachine(idle=8.0, own=0.0)  # our jobs get no CPU: starved, so no refill below
    gate = cpu_gate(machine, 4, inertia=0.7)
    first = gate(never)
    started(first)
    started(gate(never))  # 8 idle: admitted on readings
    machine.idle = 0.0
    assert gate(machine.halt_after(5)).halted
    assert gate.idle_cpus == pytest.approx(0.0) and gate.level == 1
    # The job ends and 8 CPUs go idle at the same moment.
    machine.idle = 8.0
    first.done()
    reads, began = len(machine.idle_reads), machine.elapsed
    assert not gate(never).halted
    # A new baseline at once, then one sample, which replaces the smoothed
    # value: blending would give 0.3 * 8 = 2.4 < 0.9 * 4 and need a 2nd sample.
    assert machine.idle_reads[reads:] == [began, pytest.approx(began + gate.poll_interval())]


def test_reservation_of_a_granted_job_counts_until_its_request_arrives() -> None:
    machine = FakeMachine(idle=3.0)
    gate = cpu_gate(machine, 2, inertia=0.0)
    first = gate(never)
    assert gate.reserved_cpus == 2 and gate.reservations == 1
    # 3 idle - 2 reserved < 2 required
    assert gate(machine.halt_after(5)).halted
    environ: dict[str, Any] = {}
    machine.at(7.0, lambda: first.request_received(environ))
    second = gate(machine.halt_after(30))
    assert not second.halted
    assert 7.0 <= machine.elapsed < 7.5
    assert callable(environ["RESET_CPU_RESERVATION"])
    assert gate.reserved_cpus == 2  # the second job's own reservation


@pytest.mark.parametrize(("uncertainty", "admitted"), [(1.0, True), (1.5, False)])
def test_each_reservation_multiplies_the_requirement(uncertainty: float, admitted: bool) -> None:
    machine = FakeMachine(idle=2.3)
    gate = cpu_gate(machine, 1, inertia=0.0, reservation_uncertainty=uncertainty)
    gate(never)  # reserves 1: the next job needs 0.9 * 1 * uncertainty of 2.3 - 1 = 1.3 idle
    assert (not gate(machine.halt_after(5)).halted) is admitted


def test_two_reservations_raise_the_requirement_by_the_square() -> None:
    machine = FakeMachine(idle=4.0)
    gate = cpu_gate(machine, 1, inertia=0.0, reservation_uncertainty=1.5)
    gate(never)
    assert not gate(never).halted  # 4 - 1 >= 0.9 * 1.5
    # 4 - 2 reserved = 2 < 0.9 * 1 * 1.5**2 = 2.025
    assert gate(machine.halt_after(5)).halted
    machine.idle = 4.1  # 2.1 >= 2.025
    assert not gate(machine.halt_after(10)).halted
    assert gate.reservations == 3


@pytest.mark.parametrize(("tolerance", "admitted"), [(None, True), (0.0, False)])
def test_tolerance_admits_a_second_job_on_a_core_that_reads_just_under_one_idle(
    tolerance: float | None, admitted: bool
) -> None:
    # 2 cores, one 1-CPU job running: /proc/stat's ticks and the worker's own
    # overhead make the free core read as 0.99 idle, never 1.0.
    machine = FakeMachine(idle=0.99, own=1.0)
    options = {} if tolerance is None else {"tolerance": tolerance}
    gate = cpu_gate(machine, 1, inertia=0.7, cpu_count=2, **options)
    started(gate(never))
    assert (not gate(machine.halt_after(30)).halted) is admitted
    assert gate.granted == (2 if admitted else 1)
    assert gate.level == (2 if admitted else 0)


def two_jobs_on_two_cores(own_per_job: float, **options: Any) -> tuple[FakeMachine, CpuGate, list[Grant]]:
    """A gate(1) on 2 cores whose readings admitted a 2nd job; then both run and nothing is idle.

    Each running job gets ``own_per_job`` CPUs (the worker's own CPU time).
    A third wait runs for 5 s (refused: nothing idle) so that the gate
    measures that share.
    """
    machine = FakeMachine(idle=1.0, own=own_per_job)
    gate = cpu_gate(machine, 1, inertia=0.7, cpu_count=2, **options)
    jobs = [gate(never)]
    started(jobs[0])
    jobs.append(gate(never))  # one core idle: admitted on readings
    started(jobs[1])
    machine.idle, machine.own = 0.0, 2 * own_per_job
    assert gate(machine.halt_after(machine.elapsed + 5)).halted
    return machine, gate, jobs


def test_a_level_the_readings_admitted_is_refilled_at_once_when_a_job_ends() -> None:
    machine, gate, (first, _) = two_jobs_on_two_cores(own_per_job=1.0)
    assert gate.level == 2
    assert gate.cpu_share == pytest.approx(1.0)
    assert gate.idle_cpus == pytest.approx(0.0)  # the readings alone would refuse
    ended: list[float] = []

    def end_first() -> None:
        ended.append(machine.elapsed)
        first.done()

    machine.at(machine.elapsed + 1.0, end_first)
    grant = gate(machine.halt_after(machine.elapsed + 5))
    assert not grant.halted
    assert machine.elapsed == ended[0]  # at once: no reading, no sleep after the end
    assert [t for t in machine.idle_reads if t >= ended[0]] == []
    assert gate.granted == 2
    # ... but not beyond the level.
    started(grant)
    assert gate(machine.halt_after(machine.elapsed + 5)).halted


def test_starved_jobs_lower_the_level_and_stop_the_refill() -> None:
    # Other load came: our two jobs get 0.6 CPU each, less than 0.9 * 1 required.
    machine, gate, (first, second) = two_jobs_on_two_cores(own_per_job=0.6)
    assert gate.cpu_share == pytest.approx(0.6)
    assert gate.level == 1  # one below the 2 running
    first.done()
    assert gate(machine.halt_after(machine.elapsed + 5)).halted  # no refill, nothing idle
    assert gate.granted == 1
    # At least one job always runs, starved or not.
    second.done()
    reads = len(machine.idle_reads)
    assert not gate(never).halted
    assert len(machine.idle_reads) == reads
    assert gate.level == 1


def test_the_refill_respects_max_concurrent() -> None:
    machine, gate, (first, _) = two_jobs_on_two_cores(own_per_job=1.0)
    assert gate.level == 2
    gate.max_concurrent = 1  # a cap below the level the readings admitted
    first.done()
    assert gate(machine.halt_after(machine.elapsed + 5)).halted  # no refill beyond the cap
    assert gate.granted == 1


def test_a_reservation_given_back_makes_the_readings_stale() -> None:
    machine = FakeMachine(idle=12.0)
    gate = cpu_gate(machine, 2, inertia=0.0, keep_cpu_reservation=True)
    started(gate(never))
    environ = started(gate(never))  # each started job keeps its 2 CPUs reserved
    assert not gate(never).halted  # 12 - 4 >= 0.9 * 2 * 1.3**2
    reads = len(machine.idle_reads)
    assert not gate(never).halted  # 12 - 6 >= 0.9 * 2 * 1.3**3, on the same readings
    assert len(machine.idle_reads) == reads
    # The second job says it now uses its CPUs: readings from before do not show that.
    environ["RESET_CPU_RESERVATION"](0)
    began = machine.elapsed
    assert not gate(never).halted
    assert machine.idle_reads[reads:] == [began, pytest.approx(began + gate.poll_interval())]


def test_max_concurrent_caps_grants_and_done_frees_a_place() -> None:
    machine = FakeMachine(idle=64.0)
    gate = cpu_gate(machine, 1, inertia=0.0, max_concurrent=2)
    first, second = gate(never), gate(never)
    started(first), started(second)
    assert gate(machine.halt_after(5)).halted
    machine.at(8.0, first.done)
    assert not gate(machine.halt_after(30)).halted
    assert gate.granted == 2


def test_default_max_concurrent_is_twice_the_cpus_over_required() -> None:
    machine = FakeMachine()
    assert cpu_gate(machine, 3, cpu_count=8).max_concurrent == 6
    assert cpu_gate(machine, 3, cpu_count=8, quota=2.0).max_concurrent == 2
    assert cpu_gate(machine, 16, cpu_count=8).max_concurrent == 1
    with pytest.raises(ValueError, match="max_concurrent"):
        cpu_gate(machine, 0)
    assert cpu_gate(machine, 0, max_concurrent=10).max_concurrent == 10


def test_quota_leaves_room_for_the_next_job() -> None:
    machine = FakeMachine(idle=6.0, used=1.5)
    gate = cpu_gate(machine, 1, inertia=0.0, quota=2.0)
    started(gate(never))
    assert gate(machine.halt_after(5)).halted  # 1.5 used + 1 > 2
    machine.used = 0.5
    assert not gate(machine.halt_after(10)).halted


def test_cpu_promised_admits_regardless_of_idle() -> None:
    machine = FakeMachine(idle=0.0, used=1.0)
    gate = cpu_gate(machine, 1, inertia=0.0, cpu_promised=4.0)
    started(gate(never))
    assert not gate(never).halted  # we use 1 of the 4 promised; neighbours use the rest
    strict = cpu_gate(machine, 1, inertia=0.0, cpu_promised=0.0)
    started(strict(never))
    assert strict(machine.halt_after(machine.elapsed + 5)).halted


def test_cpu_promised_still_respects_max_concurrent() -> None:
    machine = FakeMachine(idle=0.0, used=0.0)
    gate = cpu_gate(machine, 1, inertia=0.0, cpu_promised=4.0, max_concurrent=1)
    started(gate(never))
    assert gate(machine.halt_after(5)).halted


def test_cpu_promised_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine()
    monkeypatch.setenv("POTHEAD_CPU_PROMISED", "2.5")
    assert cpu_gate(machine, cpu_promised=None).cpu_promised == 2.5
    monkeypatch.delenv("POTHEAD_CPU_PROMISED")
    assert cpu_gate(machine, cpu_promised=None).cpu_promised == 0.0
    monkeypatch.setenv("POTHEAD_CPU_PROMISED", "lots")
    with pytest.raises(ValueError, match="POTHEAD_CPU_PROMISED='lots'"):
        cpu_gate(machine, cpu_promised=None)


def test_request_received_resets_the_reservation_and_offers_a_reset_callable() -> None:
    machine = FakeMachine()
    gate = cpu_gate(machine, 3)
    grant = gate(never)
    environ = started(grant)
    assert gate.reserved_cpus == 0 and gate.reservations == 0
    environ["RESET_CPU_RESERVATION"](1.5)
    assert gate.reserved_cpus == 1.5
    environ["RESET_CPU_RESERVATION"]()
    assert gate.reserved_cpus == 0
    with pytest.raises(ValueError):
        environ["RESET_CPU_RESERVATION"](-1)


def test_keep_cpu_reservation_keeps_it_until_the_job_resets_it() -> None:
    machine = FakeMachine(idle=4.0)
    gate = cpu_gate(machine, 2, inertia=0.0, keep_cpu_reservation=True)
    environ = started(gate(never))
    assert gate.reserved_cpus == 2
    assert gate(machine.halt_after(5)).halted  # 4 idle - 2 kept < 2 * 1.3
    machine.at(6.0, lambda: environ["RESET_CPU_RESERVATION"](0))
    assert not gate(machine.halt_after(30)).halted


def test_done_frees_the_grant_once() -> None:
    machine = FakeMachine()
    gate = cpu_gate(machine, 2)
    grant = gate(never)
    assert isinstance(grant, ReservationGrant)
    grant.done()
    grant.done()
    assert gate.granted == 0 and gate.reserved_cpus == 0
    grant.reset_reservation(2)  # after done: nothing to reserve for
    assert gate.reserved_cpus == 0
    assert not gate(never).halted and machine.sleeps == []  # first slot again


def test_halt_returns_promptly_with_a_grant_that_counts_for_nothing() -> None:
    machine = FakeMachine(idle=0.0)
    gate = cpu_gate(machine, 1, poll_interval=(2.0, 2.0))
    started(gate(never))
    grant = gate(machine.halt_after(0.25))
    assert grant.halted
    assert machine.elapsed <= 0.25 + 0.1 + 1e-9
    assert gate.granted == 1
    grant.request_received({})
    grant.done()
    assert gate.granted == 1


def test_halt_before_waiting_grants_nothing() -> None:
    gate = cpu_gate(FakeMachine())
    assert gate(lambda: True).halted
    assert gate.granted == 0


def test_poll_interval_follows_the_typical_wait() -> None:
    machine = FakeMachine(idle=0.0)
    gate = cpu_gate(machine, 1)
    assert gate.poll_interval() == 0.05  # 1 s assumed / 20
    started(gate(never))
    machine.at(30.0, machine.set(idle=8.0))
    gate(machine.halt_after(100))
    assert gate.poll_interval() > 0.3  # waits are long: poll less often
    assert max(machine.sleeps) <= 0.1  # but halt() is still checked often


def test_metrics_show_the_latest_readings() -> None:
    machine = FakeMachine(idle=3.0, used=2.0)
    gate = cpu_gate(machine, 1, inertia=0.0)
    assert gate.idle_cpus is None
    started(gate(never))
    gate(never)
    assert gate.idle_cpus == pytest.approx(3.0)
    assert gate.used_cpus == pytest.approx(2.0)


def test_smoothed_rate_ignores_zero_intervals_and_counter_resets() -> None:
    rate = SmoothedRate(100.0, 0.0, initial=0.0, inertia=0.5)
    assert rate.update(102.0, 1.0) == 1.0  # 2 CPU-seconds in 1 s, half-smoothed from 0
    assert rate.update(102.0, 1.0) == 1.0  # no time passed
    assert rate.update(5.0, 2.0) == 1.0  # counter went backwards: new baseline only
    assert rate.update(7.0, 3.0) == 1.5


@pytest.mark.parametrize(
    "options",
    [{"inertia": 1.0}, {"inertia": -0.1}, {"reservation_uncertainty": 0.9}, {"max_concurrent": 0}],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cpu_gate(FakeMachine(), 1, **options)


# -- memory gate ------------------------------------------------------------------------------


def test_memory_first_slot_is_granted_with_no_memory_free() -> None:
    machine = FakeMachine(available=0)
    gate = memory_gate(machine, "1.5G")
    assert gate.required == 1.5 * GiB
    assert not gate(never).halted and machine.sleeps == []
    assert gate.reserved_bytes == 1.5 * GiB


def test_memory_gate_waits_for_memory_and_counts_reservations() -> None:
    machine = FakeMachine(available=3 * GiB)
    gate = memory_gate(machine, "2G")
    first = gate(never)
    assert gate(machine.halt_after(5)).halted  # 3G - 2G reserved < 2G
    started(first)
    assert not gate(machine.halt_after(10)).halted  # the job's memory is in the readings now
    machine.available = 4 * GiB  # 4G - 2G reserved < 2G * 1.3
    assert gate(machine.halt_after(15)).halted
    machine.at(20.0, machine.set(available=5 * GiB))  # 5G - 2G >= 2.6G
    assert not gate(machine.halt_after(30)).halted
    assert 20.0 <= machine.elapsed < 20.1  # levels need no smoothing


def test_keep_memory_reservation_and_reset_with_a_size() -> None:
    machine = FakeMachine(available=8 * GiB)
    gate = memory_gate(machine, "1G", keep_memory_reservation=True)
    environ = started(gate(never))
    assert gate.reserved_bytes == GiB
    environ["RESET_MEMORY_RESERVATION"]("256M")
    assert gate.reserved_bytes == 256 * MiB
    with pytest.raises(ValueError, match="not a size"):
        environ["RESET_MEMORY_RESERVATION"]("lots")


def test_memory_default_max_concurrent_is_what_fits() -> None:
    machine = FakeMachine()
    assert memory_gate(machine, "1.5G", total=16 * GiB).max_concurrent == 10
    assert memory_gate(machine, "32G", total=16 * GiB).max_concurrent == 1
    with pytest.raises(ValueError, match="not a size"):
        memory_gate(machine, "1.5 gigs")
    with pytest.raises(ValueError, match="max_concurrent"):
        memory_gate(machine, 0)


# -- combinations ---------------------------------------------------------------------------------


def combined(machine: FakeMachine, **options: Any) -> tuple[AllOf, CpuGate, MemoryGate]:
    cpu = cpu_gate(machine, 2, inertia=0.0)
    memory = memory_gate(machine, "1G")
    return all_of(cpu, memory, **options), cpu, memory


def test_all_of_hands_out_one_grant_whose_callbacks_fan_out() -> None:
    machine = FakeMachine(idle=8.0, available=8 * GiB)
    gate, cpu, memory = combined(machine)
    grant = gate(never)
    assert isinstance(grant, CombinedGrant)
    assert (gate.granted, cpu.granted, memory.granted) == (1, 1, 1)
    assert (cpu.reserved_cpus, memory.reserved_bytes) == (2, GiB)
    environ = started(grant)
    assert {"RESET_CPU_RESERVATION", "RESET_MEMORY_RESERVATION"} <= environ.keys()
    assert (cpu.reserved_cpus, memory.reserved_bytes) == (0, 0)
    grant.done()
    grant.done()
    assert (gate.granted, cpu.granted, memory.granted) == (0, 0, 0)


def test_all_of_never_holds_one_gates_grant_while_another_refuses() -> None:
    machine = FakeMachine(idle=8.0, available=0)
    gate, cpu, memory = combined(machine)
    started(gate(never))
    seen: list[tuple[int, int]] = []
    for t in range(1, 10):
        machine.at(t, lambda: seen.append((cpu.granted, memory.granted)))
    machine.at(10.0, machine.set(available=8 * GiB))
    grant = gate(machine.halt_after(60))
    assert not grant.halted and machine.elapsed >= 10.0
    # While memory refused, the CPU gate (which would admit) was never taken.
    assert seen == [(1, 1)] * 9
    assert (cpu.granted, memory.granted) == (2, 2)


def test_all_of_waits_for_every_member_in_either_order() -> None:
    machine = FakeMachine(idle=0.0, available=0)
    gate, cpu, memory = combined(machine)
    started(gate(never))
    machine.at(5.0, machine.set(available=8 * GiB))  # memory first: still waits for CPU
    machine.at(10.0, machine.set(idle=8.0))
    assert not gate(machine.halt_after(60)).halted
    assert machine.elapsed >= 10.0


def test_all_of_halt_takes_nothing_from_members() -> None:
    machine = FakeMachine(idle=8.0, available=0)
    gate, cpu, memory = combined(machine)
    started(gate(never))
    assert gate(machine.halt_after(3)).halted
    assert (gate.granted, cpu.granted, memory.granted) == (1, 1, 1)


def test_all_of_max_concurrent_caps_the_combination() -> None:
    machine = FakeMachine(idle=64.0, available=64 * GiB)
    gate, cpu, memory = combined(machine, max_concurrent=2)
    first = gate(never)
    started(first), started(gate(never))
    assert gate(machine.halt_after(5)).halted
    machine.at(6.0, first.done)
    assert not gate(machine.halt_after(30)).halted


def test_a_member_shared_with_other_users_keeps_its_own_rules() -> None:
    machine = FakeMachine(idle=3.0, available=64 * GiB)
    gate, cpu, memory = combined(machine)
    cpu(never)  # a standalone grant, not started: 2 CPUs reserved
    assert gate(machine.halt_after(5)).halted  # 3 idle - 2 reserved < 2
    assert memory.granted == 0


def test_nested_combinations_are_woken_by_leaf_releases() -> None:
    machine = FakeMachine(idle=0.0, available=0)
    inner = all_of(cpu_gate(machine, 1), max_concurrent=1)
    outer = all_of(inner, memory_gate(machine, "1G"))
    first = outer(never)
    machine.at(2.0, first.done)
    assert not outer(machine.halt_after(30)).halted
    assert 2.0 <= machine.elapsed < 2.1


def test_all_of_refuses_plain_functions() -> None:
    with pytest.raises(TypeError, match="plain wait_for_slot"):
        all_of(cpu_gate(FakeMachine()), lambda halt: Grant(None))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        all_of()


class StubSystem(SystemResources):
    def __init__(self) -> None:  # no /sys, no psutil
        pass

    def cpu_count(self) -> int:
        return 8

    def cpu_quota(self) -> float:
        return 4.0

    def idle_cpu_seconds(self) -> float:
        return 0.0

    def used_cpu_seconds(self) -> float:
        return 0.0

    def available_memory(self) -> float:
        return 16.0 * GiB

    def total_memory(self) -> float:
        return 16.0 * GiB


def test_wait_for_resources_combines_a_cpu_and_a_memory_gate() -> None:
    gate = wait_for_resources(cpus=2, memory="1.5G", system=StubSystem())
    cpu, memory = gate.gates
    assert isinstance(cpu, CpuGate) and isinstance(memory, MemoryGate)
    assert (cpu.required, cpu.quota, cpu.max_concurrent) == (2, 4.0, 4)
    assert (memory.required, memory.max_concurrent) == (1.5 * GiB, 10)
    capped = wait_for_resources(cpus=2, memory=GiB, max_concurrent=3, system=StubSystem())
    assert [g.max_concurrent for g in (capped, *capped.gates)] == [3, 3, 3]
    assert len(wait_for_resources(memory="1G", system=StubSystem()).gates) == 1
    with pytest.raises(ValueError, match="cpus, memory"):
        wait_for_resources(system=StubSystem())


def test_reference_entry_points_build_gates() -> None:
    cpu = wait_for_idle_cpus(3, keep_cpu_reservation=True, system=StubSystem())
    assert (cpu.required, cpu.max_concurrent, cpu.keep_cpu_reservation) == (3, 3, True)
    memory = wait_for_free_memory("2G", max_concurrent=2, system=StubSystem())
    assert (memory.required, memory.max_concurrent) == (2 * GiB, 2)


def test_the_real_machine_can_be_read() -> None:
    system = SystemResources()
    assert system.cpu_count() >= 1
    assert system.cpu_quota() > 0
    assert system.idle_cpu_seconds() >= 0 and system.used_cpu_seconds() >= 0
    assert 0 < system.available_memory() <= system.total_memory()
    assert 0 < system.own_cpu_seconds() <= system.own_cpu_seconds()
    gate = wait_for_idle_cpus(1, max_concurrent=4)
    assert not gate(never).halted


# -- real threads (bounded) ---------------------------------------------------------------------------


def idle_cpus(count: float) -> Callable[[], float]:
    return lambda: time.monotonic() * count


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


def test_done_from_another_thread_wakes_the_waiter_at_once() -> None:
    gate = CpuGate(
        1, read_idle=idle_cpus(0), read_used=lambda: 0.0, cpu_count=8, quota=math.inf,
        cpu_promised=0, poll_interval=(2.0, 2.0),
    )  # fmt: skip
    first = gate(never)
    thread, result = in_thread(lambda: gate(never))
    time.sleep(0.05)
    assert not result  # busy: waiting
    began = time.monotonic()
    first.done()
    thread.join(1.0)
    assert result and not result[0].halted
    assert time.monotonic() - began < 0.5  # not the 2 s poll interval


def test_halt_from_another_thread_is_seen_promptly() -> None:
    gate = CpuGate(
        1, read_idle=idle_cpus(0), read_used=lambda: 0.0, cpu_count=8, quota=math.inf,
        cpu_promised=0, poll_interval=(2.0, 2.0),
    )  # fmt: skip
    gate(never)
    stopping = threading.Event()
    thread, result = in_thread(lambda: gate(stopping.is_set))
    time.sleep(0.05)
    began = time.monotonic()
    stopping.set()
    thread.join(1.0)
    assert result and result[0].halted
    assert time.monotonic() - began < 0.3


def test_threads_smoke_never_exceed_max_concurrent() -> None:
    gate = CpuGate(
        0.5, read_idle=idle_cpus(64), read_used=lambda: 0.0, cpu_count=64, quota=math.inf,
        cpu_promised=0, inertia=0.0, max_concurrent=3, poll_interval=(0.001, 0.001),
    )  # fmt: skip
    stopping = threading.Event()
    observed: list[int] = []
    jobs: list[threading.Thread] = []

    def job(grant: Grant) -> None:
        environ = started(grant)
        observed.append(gate.granted)
        environ["RESET_CPU_RESERVATION"](0.25)
        time.sleep(random.uniform(0, 0.005))
        grant.done()

    def poll_loop() -> None:
        while not stopping.is_set():
            grant = gate(stopping.is_set)
            if grant.halted:
                break
            thread = threading.Thread(target=job, args=(grant,), daemon=True)
            jobs.append(thread)
            thread.start()

    poller = threading.Thread(target=poll_loop, daemon=True)
    poller.start()
    time.sleep(0.3)
    stopping.set()
    poller.join(1.0)
    for thread in jobs:
        thread.join(1.0)
    assert not poller.is_alive()
    assert len(observed) > 10
    assert max(observed) <= 3
    assert gate.granted == 0 and gate.reserved_cpus == 0


def test_combinations_sharing_gates_in_opposite_orders_do_not_deadlock() -> None:
    def plenty() -> float:
        return 64.0 * GiB

    a = MemoryGate(MiB, read_available=plenty, total=64 * GiB, max_concurrent=1000, poll_interval=(0.001, 0.001))
    b = MemoryGate(MiB, read_available=plenty, total=64 * GiB, max_concurrent=1000, poll_interval=(0.001, 0.001))
    combos = [all_of(a, b), all_of(b, a)]
    deadline = time.monotonic() + 0.3
    counts = [0] * 4

    def hammer(index: int) -> None:
        combo = combos[index % 2]
        while time.monotonic() < deadline:
            grant = combo(lambda: time.monotonic() >= deadline)
            if grant.halted:
                break
            started(grant)
            counts[index] += 1
            grant.done()

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2.0)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert all(counts)
    assert a.granted == b.granted == 0


# -- cgroup parsers, on real file contents ---------------------------------------------------------------


def test_parse_cpu_max() -> None:
    assert parse_cpu_max("max 100000\n") == math.inf
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("max\n") == math.inf


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("banana\n", 'expected "$MAX $PERIOD"'),
        ("100000 0\n", "period must be positive"),
        ("0 100000\n", "quota must be positive"),
        ("lots 100000\n", "quota 'lots' is not an integer"),
        ("", 'expected "$MAX $PERIOD"'),
    ],
)
def test_parse_cpu_max_refuses_garbage(content: str, problem: str) -> None:
    with pytest.raises(CgroupFileError) as caught:
        parse_cpu_max(content, "/sys/fs/cgroup/cpu.max")
    message = str(caught.value)
    assert message.startswith("/sys/fs/cgroup/cpu.max: ")
    assert problem in message
    assert repr(content) in message
    assert isinstance(caught.value, ValueError)


def test_parse_cfs_quota() -> None:
    assert parse_cfs_quota("-1\n", "100000\n") == math.inf
    assert parse_cfs_quota("50000\n", "100000\n") == 0.5
    assert parse_cfs_quota("400000\n", "100000\n") == 4.0
    with pytest.raises(CgroupFileError, match=r"cpu.cfs_quota_us: quota must be positive or -1 \(content: '0\\n'\)"):
        parse_cfs_quota("0\n", "100000\n")
    with pytest.raises(CgroupFileError, match="cpu.cfs_period_us: period 'x' is not an integer"):
        parse_cfs_quota("50000\n", "x\n")


CPU_STAT_V2 = """usage_usec 86247905
user_usec 63376741
system_usec 22871163
nr_periods 0
nr_throttled 0
throttled_usec 0
"""


def test_parse_cpu_usage() -> None:
    assert parse_cpu_stat_usage(CPU_STAT_V2) == pytest.approx(86.247905)
    assert parse_cpuacct_usage("91680310081\n") == pytest.approx(91.680310081)
    with pytest.raises(CgroupFileError, match="cpu.stat: no usage_usec line"):
        parse_cpu_stat_usage("user_usec 5\n")
    with pytest.raises(CgroupFileError, match="usage_usec 'x' is not an integer"):
        parse_cpu_stat_usage("usage_usec x\n")
    with pytest.raises(CgroupFileError, match="cpuacct.usage: usage is negative"):
        parse_cpuacct_usage("-5\n")


def test_parse_memory_files() -> None:
    assert parse_memory_max("max\n") == math.inf
    assert parse_memory_max("1073741824\n") == GiB
    assert parse_memory_limit_in_bytes("9223372036854771712\n") == math.inf  # 4 KiB pages
    assert parse_memory_limit_in_bytes("9223372036854710272\n") == math.inf  # 64 KiB pages
    assert parse_memory_limit_in_bytes("536870912\n") == 512 * MiB
    assert parse_memory_stat("anon 100\ninactive_file 376832\n\n") == {"anon": 100, "inactive_file": 376832}
    with pytest.raises(CgroupFileError, match="memory.max: byte count is negative"):
        parse_memory_max("-5\n")
    with pytest.raises(CgroupFileError, match="memory.stat: line 'anon' is not 'key value'"):
        parse_memory_stat("anon\n")


def test_parse_proc_cgroup() -> None:
    v1 = "12:memory:/process_api/3a96\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n0::/\n"
    assert parse_proc_cgroup(v1) == {
        "memory": "/process_api/3a96",
        "cpu": "/docker/abc",
        "cpuacct": "/docker/abc",
        "name=systemd": "/",
        "": "/",
    }
    assert parse_proc_cgroup("0::/system.slice/pothead.service\n") == {"": "/system.slice/pothead.service"}
    with pytest.raises(CgroupFileError, match="/proc/self/cgroup: line 'garbage'"):
        parse_proc_cgroup("garbage\n")


# -- cgroup readers, on a temporary tree -------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


@pytest.fixture
def proc_cgroup(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    def make(content: str) -> Path:
        path = tmp_path / "proc-self-cgroup"
        path.write_text(content)
        return path

    yield make


def test_v2_container_root(tmp_path: Path, proc_cgroup: Callable[[str], Path]) -> None:
    root = tmp_path / "cgroup"
    write_tree(
        root,
        {
            "cgroup.controllers": "cpu memory pids\n",
            "cpu.max": "200000 100000\n",
            "cpu.stat": CPU_STAT_V2,
            "memory.max": str(2 * GiB) + "\n",
            "memory.current": str(GiB) + "\n",
            "memory.stat": f"anon 100\ninactive_file {256 * MiB}\n",
        },
    )
    cgroup = CgroupFS(root, proc_cgroup("0::/\n"))
    assert cgroup.version == 2
    assert cgroup.cpu_quota() == 2.0
    assert cgroup.cpu_usage() == pytest.approx(86.247905)
    assert cgroup.memory_limit() == 2 * GiB
    assert cgroup.memory_headroom() == 2 * GiB - (GiB - 256 * MiB)  # page cache is reclaimable


def test_v2_unlimited(tmp_path: Path) -> None:
    write_tree(tmp_path, {"cgroup.controllers": "", "cpu.max": "max 100000\n", "memory.max": "max\n"})
    cgroup = CgroupFS(tmp_path, None)
    assert cgroup.cpu_quota() == math.inf
    assert cgroup.cpu_usage() is None
    assert cgroup.memory_limit() == math.inf and cgroup.memory_headroom() == math.inf


def test_v2_own_cgroup_and_tighter_ancestors(tmp_path: Path, proc_cgroup: Callable[[str], Path]) -> None:
    write_tree(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory\n",
            "cpu.stat": "usage_usec 999000000\n",  # the whole host
            "work.slice/cpu.max": "150000 100000\n",
            "work.slice/memory.max": str(4 * GiB),
            "work.slice/memory.current": str(3 * GiB),
            "work.slice/pothead.service/cpu.max": "300000 100000\n",
            "work.slice/pothead.service/cpu.stat": "usage_usec 2000000\n",
            "work.slice/pothead.service/memory.max": str(2 * GiB),
            "work.slice/pothead.service/memory.current": str(GiB // 2),
        },
    )
    cgroup = CgroupFS(tmp_path, proc_cgroup("0::/work.slice/pothead.service\n"))
    assert cgroup.cpu_quota() == 1.5  # the slice's limit is tighter
    assert cgroup.cpu_usage() == 2.0  # our own service, not the host
    assert cgroup.memory_limit() == 2 * GiB
    assert cgroup.memory_headroom() == GiB  # 4G - 3G in the slice < 2G - 0.5G in the service


def test_v2_own_cgroup_not_visible_falls_back_to_the_root(tmp_path: Path, proc_cgroup: Callable[[str], Path]) -> None:
    write_tree(tmp_path, {"cgroup.controllers": "", "cpu.max": "50000 100000\n"})
    cgroup = CgroupFS(tmp_path, proc_cgroup("0::/docker/0123abcd\n"))
    assert cgroup.cpu_chain == [tmp_path]
    assert cgroup.cpu_quota() == 0.5


def test_v1_hierarchies(tmp_path: Path, proc_cgroup: Callable[[str], Path]) -> None:
    write_tree(
        tmp_path,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpuacct.usage": "91680310081\n",
            "cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n",
            "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/job/cpuacct.usage": "5000000000\n",
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/memory.usage_in_bytes": "500957184\n",
            "memory/job/memory.limit_in_bytes": str(GiB),
            "memory/job/memory.usage_in_bytes": str(600 * MiB),
            "memory/job/memory.stat": f"cache 1\ninactive_file 5\ntotal_inactive_file {100 * MiB}\n",
        },
    )
    cgroup = CgroupFS(tmp_path, proc_cgroup("5:memory:/job\n4:cpu,cpuacct:/job\n"))
    assert cgroup.version == 1
    assert cgroup.cpu_quota() == 2.5
    assert cgroup.cpu_usage() == 5.0
    assert cgroup.memory_limit() == GiB
    assert cgroup.memory_headroom() == GiB - 500 * MiB


def test_v1_separate_cpuacct_mount(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "cpu/cpu.cfs_quota_us": "100000\n",
            "cpu/cpu.cfs_period_us": "100000\n",
            "cpuacct/cpuacct.usage": "1500000000\n",
        },
    )
    cgroup = CgroupFS(tmp_path, None)
    assert (cgroup.cpu_quota(), cgroup.cpu_usage()) == (1.0, 1.5)
    assert cgroup.memory_headroom() == math.inf


def test_no_cgroups_means_no_limits(tmp_path: Path) -> None:
    cgroup = CgroupFS(tmp_path / "missing", tmp_path / "missing-too")
    assert cgroup.version is None
    assert cgroup.cpu_quota() == math.inf and cgroup.cpu_usage() is None
    assert cgroup.memory_limit() == math.inf and cgroup.memory_headroom() == math.inf


def test_malformed_cgroup_file_is_reported_with_its_path(tmp_path: Path) -> None:
    write_tree(tmp_path, {"cgroup.controllers": "", "cpu.max": "unlimited please\n"})
    with pytest.raises(CgroupFileError) as caught:
        CgroupFS(tmp_path, None).cpu_quota()
    assert str(tmp_path / "cpu.max") in str(caught.value)
    assert "'unlimited please\\n'" in str(caught.value)


def test_gates_read_a_cgroup_tree(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "cgroup.controllers": "",
            "cpu.max": "200000 100000\n",
            "cpu.stat": "usage_usec 1000000\n",
            "memory.max": str(4 * GiB),
            "memory.current": str(GiB),
        },
    )
    system = SystemResources(CgroupFS(tmp_path, None))
    assert system.cpu_quota() == 2.0
    assert system.used_cpu_seconds() == 1.0
    assert system.total_memory() <= 4 * GiB
    assert system.available_memory() <= 3 * GiB
    gate = wait_for_idle_cpus(1, system=system)
    assert gate.quota == 2.0 and gate.max_concurrent == math.ceil(2 * min(2.0, os.cpu_count() or 1))


def test_own_cpu_comes_from_the_cgroup_only_when_it_holds_only_us(tmp_path: Path) -> None:
    usage = "usage_usec 123456000000\n"  # 123456 s: far more than this test process has used
    ours, shared = tmp_path / "ours", tmp_path / "shared"
    write_tree(ours, {"cgroup.controllers": "", "cpu.stat": usage, "cgroup.procs": f"{os.getpid()}\n"})
    procs = f"{os.getpid()}\n{os.getppid()}\n"
    write_tree(shared, {"cgroup.controllers": "", "cpu.stat": usage, "cgroup.procs": procs})
    assert SystemResources(CgroupFS(ours, None)).own_cpu_seconds() == 123456.0
    # our parent (not our descendant) is in there too: this process and its children instead.
    own = SystemResources(CgroupFS(shared, None)).own_cpu_seconds()
    assert 0 < own < 123456.0
    assert own >= time.process_time() - 0.1  # psutil counts in 10 ms ticks


def test_gate_is_a_gate() -> None:
    assert isinstance(cpu_gate(FakeMachine()), Gate)
