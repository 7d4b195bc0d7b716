"""
Acceptance test: bodies stream through the hub; its memory does not grow with
their size.

A real hub and a real worker run as separate ``twistd`` processes on
127.0.0.1 so the hub's resident set size can be measured from outside (psutil).
The client is plain blocking ``http.client``; no reactor is involved.

For each transfer the hub's RSS is sampled every ~50 ms in a background
thread, and the kernel's own peak (``VmHWM``, reset through
``/proc/PID/clear_refs`` where allowed) catches spikes between samples.  The
growth is measured against one baseline taken after a small warm-up request.

Run with ``pytest tests/test_memory.py -s`` to see the figures.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

MB = 1024 * 1024
LIMIT_MB = 30.0
DOWNLOAD_BYTES = 100 * MB
UPLOAD_BYTES = 200 * MB
CHUNK = 64 * 1024
SLOW_PART = 30 * MB  # the slow consumer reads this much slowly, the rest fast
SLOW_SLEEP = 0.005  # seconds between 64 KB reads: ~12 MB/s, far below what the worker produces

VENV_BIN = Path(sys.executable).parent
TWISTD = str(VENV_BIN / "twistd")

APP = textwrap.dedent(
    '''
    """WSGI app for tests/test_memory.py."""
    import hashlib
    import json
    import struct

    CHUNK = 64 * 1024
    BIG = 100 * 1024 * 1024
    _BASE = bytes(range(256)) * (CHUNK // 256)


    def block(i):
        # Every 64 KB block is different, so a reordered, repeated or lost
        # block changes the hash.
        return struct.pack(">Q", i) + _BASE[8:]


    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if method == "GET" and path == "/big":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return (block(i) for i in range(BIG // CHUNK))
        if method == "GET" and path == "/big-length":
            start_response(
                "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(BIG))]
            )
            return (block(i) for i in range(BIG // CHUNK))
        if method == "POST" and path == "/upload":
            stream = environ["wsgi.input"]
            digest = hashlib.sha256()
            count = 0
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                count += len(data)
                digest.update(data)
            body = json.dumps({"bytes": count, "sha256": digest.hexdigest()}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        body = b"small\\n"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    '''
)


def _block(i: int) -> bytes:
    base = bytes(range(256)) * (CHUNK // 256)
    return i.to_bytes(8, "big") + base[8:]


def expected_download_sha256() -> str:
    digest = hashlib.sha256()
    for i in range(DOWNLOAD_BYTES // CHUNK):
        digest.update(_block(i))
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout}s:\n{log.read_text(errors='replace')}")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM by PID, then SIGKILL by PID if it does not exit."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class PeakRSS:
    """
    Highest RSS of one process while the ``with`` block runs: sampled every
    ``interval`` seconds, and the kernel's VmHWM (reset on entry) as well.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.hwm: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hwm_reset = False

    def _rss(self) -> int:
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._rss())
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(self._rss())
        if self._hwm_reset:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm = int(line.split()[1]) * 1024

    @property
    def peak(self) -> int:
        return max(self.samples + ([self.hwm] if self.hwm is not None else []))


class RecordingConnection(http.client.HTTPConnection):
    """Remembers the request header names it sent (to prove a body went chunked)."""

    def putheader(self, header: str | bytes, *values: Any) -> None:
        name = header.decode("latin-1") if isinstance(header, bytes) else header
        self.sent_headers = getattr(self, "sent_headers", []) + [name.lower()]
        super().putheader(header, *values)


@dataclass
class Processes:
    hub: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    consumer_port: int
    workdir: Path
    hub_baseline: int = 0
    worker_baseline: int = 0
    figures: dict[str, dict[str, float]] = field(default_factory=dict)

    def connection(self) -> RecordingConnection:
        return RecordingConnection("127.0.0.1", self.consumer_port, timeout=120)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} log ---\n{(self.workdir / name).read_text(errors='replace')[-4000:]}"
            for name in ("hub.log", "worker.log")
        )

    def measure(self, label: str) -> MeasureBoth:
        return MeasureBoth(self, label)

    def report(self, label: str) -> str:
        f = self.figures[label]
        return (
            f"[memory] {label}: {f['mbytes']:.0f} MB in {f['seconds']:.1f} s; hub peak RSS growth "
            f"{f['hub_growth_mb']:.1f} MB over baseline {f['hub_baseline_mb']:.1f} MB "
            f"(kernel VmHWM {f['hub_hwm_growth_mb']:.1f} MB, {f['samples']:.0f} samples); "
            f"worker peak growth {f['worker_growth_mb']:.1f} MB (not asserted)"
        )


class MeasureBoth:
    """Peak RSS of hub and worker during one transfer, stored in ``figures``."""

    def __init__(self, processes: Processes, label: str) -> None:
        self.p = processes
        self.label = label
        self.mbytes = 0.0

    def __enter__(self) -> MeasureBoth:
        self.hub = PeakRSS(self.p.hub.pid).__enter__()
        self.worker = PeakRSS(self.p.worker.pid).__enter__()
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.monotonic() - self.started
        self.hub.__exit__()
        self.worker.__exit__()
        hwm = self.hub.hwm if self.hub.hwm is not None else max(self.hub.samples)
        self.p.figures[self.label] = {
            "mbytes": self.mbytes,
            "seconds": seconds,
            "hub_baseline_mb": self.p.hub_baseline / MB,
            "hub_growth_mb": (self.hub.peak - self.p.hub_baseline) / MB,
            "hub_hwm_growth_mb": (hwm - self.p.hub_baseline) / MB,
            "samples": float(len(self.hub.samples)),
            "worker_growth_mb": (self.worker.peak - self.p.worker_baseline) / MB,
        }


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    workdir = tmp_path_factory.mktemp("memory")
    (workdir / "memapp.py").write_text(APP)
    consumer_port, worker_port = free_port(), free_port()
    pythonpath = os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    hub = worker = None
    hub_log = (workdir / "hub.log").open("wb")
    worker_log = (workdir / "worker.log").open("wb")
    try:
        hub = subprocess.Popen(
            [
                TWISTD, "-n", "--pidfile=", "pothead-hub",
                "--listen", f"tcp:{consumer_port}:interface=127.0.0.1",
                "--workers", f"tcp:{worker_port}:interface=127.0.0.1",
                "--max-body", "1G",
            ],
            cwd=workdir, env=env, stdout=hub_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Only the consumer port is probed: a probe of the worker port would be
        # a "worker" connection that closes at once, and a job could be
        # dispatched onto it.  Both ports are bound before the reactor runs.
        wait_for_port(consumer_port, hub, workdir / "hub.log")
        worker = subprocess.Popen(
            [
                TWISTD, "-n", "--pidfile=", "pothead-worker",
                "--connect", f"127.0.0.1:{worker_port}",
                "--threads", "1",
                "memapp:app",
            ],
            cwd=workdir, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        p = Processes(hub, worker, consumer_port, workdir)

        # Warm-up: one small request of each kind (it also waits for the worker
        # to connect: the job queues until then).
        conn = p.connection()
        try:
            conn.request("GET", "/small")
            response = conn.getresponse()
            assert response.status == 200, p.logs()
            assert response.read() == b"small\n"
            conn.request("POST", "/upload", body=b"x" * 200_000)
            response = conn.getresponse()
            assert response.status == 200, p.logs()
            assert json.loads(response.read())["bytes"] == 200_000
        finally:
            conn.close()
        time.sleep(0.3)
        p.hub_baseline = psutil.Process(hub.pid).memory_info().rss
        p.worker_baseline = psutil.Process(worker.pid).memory_info().rss
        print(f"\n[memory] baseline after warm-up: hub {p.hub_baseline / MB:.1f} MB, worker {p.worker_baseline / MB:.1f} MB")
        yield p
    finally:
        stop(worker)
        stop(hub)
        hub_log.close()
        worker_log.close()


def check_growth(p: Processes, label: str) -> None:
    print("\n" + p.report(label))
    growth = p.figures[label]["hub_growth_mb"]
    assert growth < LIMIT_MB, f"{label}: hub RSS grew by {growth:.1f} MB (limit {LIMIT_MB} MB)\n{p.logs()}"
    assert p.hub.poll() is None, f"hub died\n{p.logs()}"


def download(p: Processes, path: str, *, slow_bytes: int = 0) -> tuple[int, str, float]:
    """GET ``path``, reading in 64 KB pieces; the first ``slow_bytes`` slowly."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    received = 0
    conn = p.connection()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, p.logs()
        while True:
            n = response.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            received += n
            if received <= slow_bytes:
                time.sleep(SLOW_SLEEP)
    finally:
        conn.close()
    return received, digest.hexdigest(), received / MB


def upload_body(total: int, digest: Any) -> Iterator[bytes]:
    """``total`` bytes in 1 MB pieces, each different; feeds ``digest`` as it goes."""
    base = os.urandom(MB)
    for i in range(total // MB):
        piece = i.to_bytes(8, "big") + base[8:]
        digest.update(piece)
        yield piece


def upload(p: Processes, *, known_length: bool, content_type: str = "application/octet-stream") -> tuple[dict[str, object], str]:
    digest = hashlib.sha256()
    headers = {"Content-Type": content_type}
    if known_length:
        headers["Content-Length"] = str(UPLOAD_BYTES)
    conn = p.connection()
    try:
        # Without Content-Length http.client sends the generator chunked.
        conn.request("POST", "/upload", body=upload_body(UPLOAD_BYTES, digest), headers=headers)
        framing = "content-length" if known_length else "transfer-encoding"
        assert framing in conn.sent_headers, conn.sent_headers
        response = conn.getresponse()
        text = response.read()
        assert response.status == 200, f"{response.status} {text!r}\n{p.logs()}"
    finally:
        conn.close()
    return json.loads(text), digest.hexdigest()


# -- the transfers ---------------------------------------------------------------


def test_download_100mb_chunked(processes: Processes) -> None:
    p = processes
    with p.measure("download 100 MB (chunked)") as m:
        size, sha, m.mbytes = download(p, "/big")
    assert size == DOWNLOAD_BYTES
    assert sha == expected_download_sha256()
    check_growth(p, "download 100 MB (chunked)")


def test_download_100mb_content_length(processes: Processes) -> None:
    p = processes
    with p.measure("download 100 MB (Content-Length)") as m:
        size, sha, m.mbytes = download(p, "/big-length")
    assert size == DOWNLOAD_BYTES
    assert sha == expected_download_sha256()
    check_growth(p, "download 100 MB (Content-Length)")


def test_upload_200mb_chunked(processes: Processes) -> None:
    p = processes
    with p.measure("upload 200 MB (chunked)") as m:
        result, sha = upload(p, known_length=False)
        m.mbytes = UPLOAD_BYTES / MB
    assert result == {"bytes": UPLOAD_BYTES, "sha256": sha}
    check_growth(p, "upload 200 MB (chunked)")


def test_upload_200mb_content_length(processes: Processes) -> None:
    p = processes
    with p.measure("upload 200 MB (Content-Length)") as m:
        result, sha = upload(p, known_length=True)
        m.mbytes = UPLOAD_BYTES / MB
    assert result == {"bytes": UPLOAD_BYTES, "sha256": sha}
    check_growth(p, "upload 200 MB (Content-Length)")


def test_upload_200mb_multipart_form_data(processes: Processes) -> None:
    # twisted.web would parse a multipart POST into request.args, in memory,
    # on both hub and worker: pothead turns that off (the body is only forwarded).
    p = processes
    with p.measure("upload 200 MB (multipart/form-data)") as m:
        result, sha = upload(p, known_length=True, content_type="multipart/form-data; boundary=xyz")
        m.mbytes = UPLOAD_BYTES / MB
    assert result == {"bytes": UPLOAD_BYTES, "sha256": sha}
    check_growth(p, "upload 200 MB (multipart/form-data)")


def test_slow_consumer_download(processes: Processes) -> None:
    # The first 30 MB are read at ~12 MB/s while the worker could produce
    # hundreds of MB/s: without backpressure the difference piles up in the hub.
    p = processes
    label = "slow consumer 100 MB (first 30 MB slowly)"
    with p.measure(label) as m:
        size, sha, m.mbytes = download(p, "/big", slow_bytes=SLOW_PART)
    assert size == DOWNLOAD_BYTES
    assert sha == expected_download_sha256()
    assert p.figures[label]["seconds"] > SLOW_PART / CHUNK * SLOW_SLEEP  # it really was slow
    check_growth(p, label)


def test_zz_summary(processes: Processes) -> None:
    """Last in the file: print every figure once more, in one block."""
    p = processes
    print("\n[memory] === hub RSS growth per transfer (limit %.0f MB) ===" % LIMIT_MB)
    for label in p.figures:
        print(p.report(label))
    assert p.figures, "no transfer was measured"
