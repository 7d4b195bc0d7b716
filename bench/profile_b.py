"""
Workload B for one system, with an optional py-spy profile: where the hub's
(or a worker's) CPU goes per request.  A development tool, not part of
``make bench``::

    .venv/bin/python bench/profile_b.py [--system pothead] [--workers 4] [--connections 16]
        [--seconds 4] [--py-spy hub|worker] [--repeat 1]

Prints req/s, p50/p99 and CPU µs per request for the balancer and the
workers; with ``--py-spy`` also the top functions by inclusive share (GIL
held), from a raw py-spy dump written to bench/out/profile/.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import systems as S  # noqa: E402
from run import wrk  # noqa: E402


def top(raw: Path, n: int = 40, *, own: bool = False) -> list[tuple[float, str]]:
    """Share of samples per function from py-spy's raw (collapsed) output:
    inclusive, or with ``own`` the function's own time (top of the stack)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        for frame in [frames[-1]] if own else set(frames):
            counts[frame] += samples
    return [(100.0 * c / max(total, 1), f) for f, c in counts.most_common(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="pothead")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--py-spy", choices=("hub", "worker"), default=None)
    parser.add_argument("--reference-python", default=str(S.REPO / ".venv-reference" / "bin" / "python"))
    args = parser.parse_args()

    out = S.BENCH / "out" / "profile"
    out.mkdir(parents=True, exist_ok=True)
    classes = {cls.name: cls for cls in S.ALL}
    system = classes[args.system](out, args.reference_python)
    try:
        system.start(args.workers)
        wrk(system.port, args.connections, 1.0, out, "warmup")
        time.sleep(0.5)
        for r in range(args.repeat):
            pids = [system.hub_pid] + [w.pid for w in system.workers]
            spy = None
            raw = out / f"{args.system}-{args.py_spy}.txt"
            if args.py_spy:
                target = pids[0] if args.py_spy == "hub" else pids[1]
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                spy = subprocess.Popen(
                    [py_spy, "record", "--gil", "--nonblocking", "-r", "500", "-f", "raw", "-o", str(raw),
                     "-d", str(int(args.seconds)), "-p", str(target)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
            cpu0 = [S.cpu_seconds(p) for p in pids]
            result = wrk(system.port, args.connections, args.seconds, out, f"run{r}")
            cpu1 = [S.cpu_seconds(p) for p in pids]
            ok = max(1, result["requests"] - result["non2xx"])
            print(
                f"{args.system}: {result['rps']:.0f} req/s  p50 {result['p50'] * 1e3:.2f} ms  "
                f"p99 {result['p99'] * 1e3:.2f} ms  hub {(cpu1[0] - cpu0[0]) / ok * 1e6:.0f} us/req  "
                f"workers {(sum(cpu1[1:]) - sum(cpu0[1:])) / ok * 1e6:.0f} us/req  "
                f"errors {result['non2xx'] + result['socket_errors']}",
                flush=True,
            )
            if spy is not None:
                spy.wait(timeout=args.seconds + 30)
                print("-- inclusive")
                for share, frame in top(raw, args.top):
                    print(f"{share:5.1f}%  {frame}")
                print("-- own time")
                for share, frame in top(raw, args.top, own=True):
                    print(f"{share:5.1f}%  {frame}")
    finally:
        system.cleanup()


if __name__ == "__main__":
    main()
