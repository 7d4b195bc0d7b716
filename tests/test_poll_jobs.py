"""
``--poll-jobs`` end to end: a real hub and a real ``twistd pothead-worker
--poll-jobs`` process whose app is gated by ``pothead.gating``.

The worker runs in its own process so that the CPU gate reads real CPU use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pothead.testing import free_port, wait_for_port

pytestmark = pytest.mark.no_reactor

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class Stack:
    def __init__(self, app: str, tmp_path: Path) -> None:
        self.consumer, self.workers = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}")
        self.hub_log = open(tmp_path / "hub.log", "wb")
        self.worker_log = open(tmp_path / "worker.log", "wb")
        self.hub = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pothead-hub", f"--listen=tcp:{self.consumer}:interface=127.0.0.1",
             f"--workers=tcp:{self.workers}:interface=127.0.0.1"],
            stdout=self.hub_log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
        wait_for_port(self.consumer)
        self.worker = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pothead-worker", f"--connect=127.0.0.1:{self.workers}", "--poll-jobs", app],
            stdout=self.worker_log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.consumer, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        for process in (self.worker, self.hub):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (self.worker, self.hub):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.hub_log.close()
        self.worker_log.close()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = best = 0
    for _, delta in events:
        level += delta
        best = max(best, level)
    return best


def test_cpu_gate_bounds_concurrency_and_keeps_one_running(tmp_path: Path) -> None:
    stack = Stack("_poll_apps:cpu_app", tmp_path)
    try:
        stack.get("/warmup")
        jobs = 16
        offered = time.time()
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda i: stack.get(f"/job/{i}"), range(jobs)))
        finished = time.time()
        assert all(status == 200 for status, _ in results), results
        reports = [json.loads(body) for _, body in results]
        intervals = sorted((r["start"], r["end"]) for r in reports)
        # Bounded: max_concurrent for wait_for_idle_cpus(1) is ceil(2 * cpus / 1);
        # on this 2-core machine the gate must not run all 16 at once.
        cpus = os.cpu_count() or 1
        assert _max_overlap(intervals) <= 2 * cpus
        # Never starved: while jobs were waiting, one was always running --
        # no gap between one job's end and the next job's start beyond the
        # cost of a reconnect.
        gaps = []
        busy_until = intervals[0][1]
        for start, end in intervals[1:]:
            gaps.append(start - busy_until)
            busy_until = max(busy_until, end)
        assert max(gaps) < 0.5, gaps
        assert intervals[0][0] - offered < 2.0
        # Each job is 0.2 s of CPU; with the gate the batch cannot take longer
        # than running them one at a time plus overheads.
        assert finished - offered < jobs * 0.2 * 2 + 3
        assert all(r["reset"] for r in reports), "RESET_CPU_RESERVATION missing from environ"
    finally:
        stack.stop()


def test_unsatisfiable_memory_gate_runs_jobs_one_at_a_time(tmp_path: Path) -> None:
    stack = Stack("_poll_apps:memory_app", tmp_path)
    try:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda i: stack.get(f"/job/{i}"), range(5)))
        assert all(status == 200 for status, _ in results), results
        intervals = sorted((json.loads(body)["start"], json.loads(body)["end"]) for _, body in results)
        assert _max_overlap(intervals) == 1
    finally:
        stack.stop()


def test_original_apps_gate_line_runs_unchanged(tmp_path: Path) -> None:
    # `app.wait_for_slot = wait_for_idle_cpus(3)`, as in apps for the original
    # POTHEAD: every job is answered; on a machine without 3 idle CPUs beside a
    # running job the gate runs them one at a time, never more than its cap.
    stack = Stack("_poll_apps:original_app", tmp_path)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: stack.get(f"/job/{i}"), range(4)))
        assert all(status == 200 for status, _ in results), results
        intervals = sorted((json.loads(body)["start"], json.loads(body)["end"]) for _, body in results)
        cpus = os.cpu_count() or 1
        if cpus < 4:
            assert _max_overlap(intervals) == 1
        else:
            assert _max_overlap(intervals) <= -(-2 * cpus // 3)
    finally:
        stack.stop()


def test_sigterm_unblocks_wait_for_slot(tmp_path: Path) -> None:
    stack = Stack("_poll_apps:blocked_app", tmp_path)
    try:
        assert stack.get("/")[0] == 200  # the one granted slot works
        time.sleep(0.3)  # the gate is now blocked in wait_for_slot
        started = time.monotonic()
        stack.worker.send_signal(signal.SIGTERM)
        assert stack.worker.wait(timeout=10) == 0
        assert b"worker stopped" in (tmp_path / "worker.log").read_bytes()
        assert time.monotonic() - started < 5
    finally:
        stack.stop()
