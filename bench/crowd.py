"""
Many connections at once, for workload C (scale and memory).

``requests`` mode: open ``--count`` connections to the consumer port (at most
``--connecting`` connects in progress at a time, so no accept queue
overflows), send ``GET <path>`` with ``Connection: close`` on each, print
``SENT <ok> <failed>`` once all are written (within ``--deadline`` seconds),
read a ``GO`` line from stdin (the driver has measured and started the
workers), then wait up to ``--wait`` seconds for every response and write
the completion time (``time.time()``) and status of each to ``--out``.  ``--occupy K --occupy-ms X`` first sends K
long jobs of X ms (to fill HAProxy's servers, which cannot queue without one).

``idle`` mode: open ``--count`` connections (worker connections that never
answer), print ``CONNECTED <n>``, hold them until a line arrives on stdin.

    python bench/crowd.py requests --port 18080 --count 10000 --out done.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

HOST = "127.0.0.1"


def request_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode("ascii")


async def requests_mode(args: argparse.Namespace) -> None:
    gate = asyncio.Semaphore(args.connecting)
    written = 0
    failed = 0
    all_written = asyncio.Event()
    finished: list[float | None] = [None] * args.count
    status: list[int | None] = [None] * args.count

    def count_written(ok: bool) -> None:
        nonlocal written, failed
        if ok:
            written += 1
        else:
            failed += 1
        if written + failed == args.count:
            all_written.set()

    async def one(i: int, path: str, record: bool) -> None:
        try:
            async with gate:
                reader, writer = await asyncio.open_connection(HOST, args.port)
                writer.write(request_bytes(path))
                await writer.drain()
        except OSError:
            if record:
                count_written(False)
            return
        if record:
            count_written(True)
        try:
            head = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if len(head) < 32:
                    head += data[:32]
            if record:
                finished[i] = time.time()
                parts = head.split(b" ", 2)
                status[i] = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
        except OSError:
            if record:
                status[i] = -1
        finally:
            writer.close()

    tasks = []
    for k in range(args.occupy):
        tasks.append(asyncio.ensure_future(one(-1, f"/job?ms={args.occupy_ms}&occupy={k}", False)))
    if args.occupy:
        await asyncio.sleep(0.5)
    started = time.time()
    for i in range(args.count):
        tasks.append(asyncio.ensure_future(one(i, f"{args.path}&n={i}", True)))
    if args.count == 0:
        all_written.set()
    try:
        await asyncio.wait_for(all_written.wait(), timeout=args.deadline)
    except asyncio.TimeoutError:
        pass
    print(f"SENT {written} {failed} {time.time() - started:.3f}", flush=True)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout=args.deadline)
    done, pending = await asyncio.wait(tasks, timeout=args.wait)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    with open(args.out, "w") as f:
        json.dump({"started": started, "finished": finished, "status": status, "written": written, "failed": failed}, f)
    print("DONE", flush=True)


async def idle_mode(args: argparse.Namespace) -> None:
    gate = asyncio.Semaphore(args.connecting)
    writers = []

    async def one() -> None:
        async with gate:
            try:
                _, writer = await asyncio.open_connection(HOST, args.port)
            except OSError:
                return
            writers.append(writer)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(args.count))), timeout=args.deadline)
    print(f"CONNECTED {len(writers)}", flush=True)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout=args.deadline)
    for writer in writers:
        writer.close()
    print("DONE", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="many connections at once (workload C)")
    parser.add_argument("mode", choices=("requests", "idle"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--path", default="/job?ms=0")
    parser.add_argument("--connecting", type=int, default=100, help="connects in progress at once")
    parser.add_argument("--occupy", type=int, default=0)
    parser.add_argument("--occupy-ms", type=float, default=0)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds to connect/send, and to get GO")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the responses after GO")
    parser.add_argument("--out", default="/dev/null")
    args = parser.parse_args()
    asyncio.run(requests_mode(args) if args.mode == "requests" else idle_mode(args))


if __name__ == "__main__":
    main()
