"""
Open-loop replay client for workload A: one process per system under test.

It reads a trace (arrival offsets and job sizes, from bench/simulate.py),
warms the system up, prints ``READY``, reads the common start time (a
``time.time()`` epoch) from stdin, and then opens one new connection per job
at its scheduled arrival -- whether or not earlier jobs have finished -- with
``GET /job?ms=<size>`` and ``Connection: close``.  A job's latency is the
moment its response is complete (EOF) minus its *scheduled* arrival, so any
lag of this client counts against the system; the lag (actual send minus
scheduled) is recorded per job so it can be checked.

Bounded: every job still open at ``--deadline`` seconds after the start is
abandoned (recorded as incomplete).

    python bench/replay.py --port 18080 --trace trace.json --deadline 120 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

HOST = "127.0.0.1"


def request_bytes(ms: float, index: int) -> bytes:
    return (
        f"GET /job?ms={ms:.3f}&i={index} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
        f"User-Agent: pothead-bench\r\n\r\n"
    ).encode("ascii")


async def fetch(port: int, payload: bytes) -> int:
    """Send one request on a new connection; read to EOF; return the status code (-1: no status line)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(payload)
        head = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if len(head) < 64:
                head += data[:64]
        parts = head.split(b" ", 2)
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    finally:
        writer.close()


async def warm_up(port: int, count: int, timeout: float) -> int:
    """``count`` trivial jobs at once; returns how many answered 200 within ``timeout``."""
    if count <= 0:
        return 0
    tasks = [asyncio.ensure_future(fetch(port, request_bytes(0.0, -1 - i))) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    return sum(1 for t in done if not t.cancelled() and t.exception() is None and t.result() == 200)


async def replay(port: int, arrivals: list[float], sizes: list[float], start_epoch: float, deadline: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + (start_epoch - time.time())
    n = len(arrivals)
    lag: list[float | None] = [None] * n
    latency: list[float | None] = [None] * n
    status: list[int | None] = [None] * n
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    remaining = n
    all_done = loop.create_future()

    async def job(i: int, scheduled: float) -> None:
        nonlocal remaining
        try:
            status[i] = await fetch(port, request_bytes(sizes[i] * 1000.0, i))
            latency[i] = loop.time() - scheduled
        except (OSError, asyncio.IncompleteReadError) as e:
            key = type(e).__name__
            errors[key] = errors.get(key, 0) + 1
            status[i] = -1
            latency[i] = loop.time() - scheduled
        finally:
            remaining -= 1
            if remaining == 0 and not all_done.done():
                all_done.set_result(None)

    def launch(i: int, scheduled: float) -> None:
        lag[i] = loop.time() - scheduled
        task = loop.create_task(job(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # A metronome thread sleeps precisely (nanosleep) until each arrival and
    # wakes the loop: asyncio's own timers round epoll's timeout up to whole
    # milliseconds, which would add up to 1 ms of lag to every job.
    stop = threading.Event()
    mono_t0 = time.monotonic() + (t0 - loop.time())

    def metronome() -> None:
        for i, offset in enumerate(arrivals):
            while not stop.is_set():
                left = mono_t0 + offset - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.5))
            if stop.is_set():
                return
            loop.call_soon_threadsafe(launch, i, t0 + offset)

    ticker = threading.Thread(target=metronome, name="metronome", daemon=True)
    ticker.start()
    try:
        await asyncio.wait_for(asyncio.shield(all_done), timeout=max(0.0, t0 + deadline - loop.time()))
    except asyncio.TimeoutError:
        pass
    stop.set()
    ticker.join(1.0)
    abandoned = len(tasks)
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(list(tasks), timeout=5)
    return {
        "lag": lag,
        "latency": latency,
        "status": status,
        "errors": errors,
        "abandoned": abandoned,
        "wall": loop.time() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="open-loop trace replay (workload A)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trace", required=True, help="JSON with arrivals and sizes (seconds)")
    parser.add_argument("--deadline", type=float, required=True, help="seconds after the start to give up")
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup", type=int, default=8, help="trivial jobs sent (concurrently) before READY")
    parser.add_argument("--warmup-timeout", type=float, default=15.0)
    args = parser.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)

    warmed = asyncio.run(warm_up(args.port, args.warmup, args.warmup_timeout))
    print(f"READY {warmed}", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        raise SystemExit("replay: no start time on stdin")
    start_epoch = float(line)
    result = asyncio.run(replay(args.port, trace["arrivals"], trace["sizes"], start_epoch, args.deadline))
    result["warmed"] = warmed
    with open(args.out, "w") as f:
        json.dump(result, f)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
