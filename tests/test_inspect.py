"""
The operators' views: the worker's ``/inspect`` and ``/apocalypse``
(``--inspect``, ``--inspection-port``) and the hub's ``/status`` (``--admin``),
end to end through a real hub, with blocking ``http.client`` clients on threads.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from _interop_procs import TWISTD, clean_env, free_port, spawn, stop, wait_for, wait_for_log
from pothead.config import HubConfig, WorkerConfig
from pothead.testing import sleep, start_hub, start_worker, wait_until
from test_redirect import APP_SOURCE, LOOPBACK, Recorder, fetch, get, make_app, pair

JSON = {"Accept": "application/json"}


def port_of(listener: Any) -> int:
    assert listener is not None and listener.port is not None
    return int(listener.port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_inspect_lists_jobs_parked_redirects_and_waiting_connections() -> None:
    async with pair(threads=3, inspect=LOOPBACK, redirect_expiry=15.0) as p:
        inspect_url = f"http://127.0.0.1:{port_of(p.worker.inspect_listener)}/inspect"
        parked = await fetch(p.url("/body"), {"X-Request-Id": "parked-one"})
        assert parked.status == 303
        running = deferToThread(get, p.url("/wait"), headers={"X-Request-Id": "running-one"})
        await wait_until(reactor, lambda: "/wait" in p.recorder.kinds("start"), timeout=5)
        await sleep(reactor, 0.2)

        text = await fetch(inspect_url)
        assert text.status == 200
        assert text.headers["content-type"].startswith("text/plain")
        body = text.body.decode()
        assert "pothead worker: running" in body
        assert "requests in flight: 2" in body
        assert "running-one" in body and "parked-one" in body
        assert "connections waiting for a job: 1" in body
        assert "redirects parked: 1" in body and "expires in" in body
        key = parked.headers["location"].rsplit("/", 1)[-1]
        assert key not in body  # whoever reads this must not be able to fetch the body

        reply = await fetch(inspect_url, JSON)
        assert reply.headers["content-type"] == "application/json"
        status = json.loads(reply.body)
        assert key not in reply.body.decode()
        assert status["state"] == "running"
        assert status["waiting_for_job"] == 1
        assert (status["slots"], status["busy_slots"]) == (3, 2)
        jobs = {job["request_id"]: job for job in status["in_flight"]}
        assert set(jobs) == {"parked-one", "running-one"}
        assert jobs["running-one"]["phase"] == "running"
        assert jobs["parked-one"]["phase"] == "redirect parked"
        assert jobs["running-one"]["age"] >= 0.2
        [entry] = status["redirects"]["parked"]
        assert entry["request_id"] == "parked-one"
        assert 0 < entry["expires_in"] <= 15.0
        assert status["totals"]["redirect_parked"] == 1

        p.recorder.release.set()
        second = await running
        assert second.status == 303
        both = json.loads((await fetch(inspect_url, JSON)).body)
        assert [job["phase"] for job in both["in_flight"]] == ["redirect parked", "redirect parked"]
        assert len(both["redirects"]["parked"]) == 2
        for location in (parked.headers["location"], second.headers["location"]):
            assert (await fetch(location)).status == 200
        # Once nothing runs, every slot waits for a job again.
        await wait_until(reactor, lambda: p.worker.runtime.idle_connections == 3, timeout=5)
        after = json.loads((await fetch(inspect_url, JSON)).body)
        assert (after["in_flight"], after["redirects"]["parked"], after["waiting_for_job"]) == ([], [], 3)


@pytest_twisted.ensureDeferred
async def test_apocalypse_streams_until_the_worker_has_stopped() -> None:
    async with pair(threads=1, inspect=LOOPBACK) as p:
        assert p.worker.inspection is not None
        p.worker.inspection.interval = 0.2
        port = port_of(p.worker.inspect_listener)
        running = deferToThread(get, p.url("/wait"))
        await wait_until(reactor, lambda: "/wait" in p.recorder.kinds("start"), timeout=5)

        lines: list[tuple[float, str]] = []

        def watch() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                connection.request("GET", "/apocalypse")
                response = connection.getresponse()
                assert response.status == 200
                while True:
                    line = response.readline()
                    if not line:
                        return
                    lines.append((time.monotonic(), line.decode()))
            finally:
                connection.close()

        watching = deferToThread(watch)
        await sleep(reactor, 0.5)
        p.worker_stopped = True
        stopped = p.worker.stopService()
        await sleep(reactor, 0.5)
        assert not watching.called, "the stream ended while the worker was still draining"
        p.recorder.release.set()
        reply = await running
        assert reply.status == 200  # started while stopping: not parked, straight through the hub
        stopped.addTimeout(10, reactor)
        await stopped
        watching.addTimeout(10, reactor)
        await watching

        texts = [text for _, text in lines]
        assert texts[-1] == "It's time\n", texts
        not_yet = [text for text in texts[:-1] if text.startswith("Not yet")]
        assert len(not_yet) == len(texts) - 1 and len(not_yet) >= 4, texts
        assert "running, 1 jobs in flight" in not_yet[0]
        assert any(text.startswith("Not yet: stopping") for text in not_yet), texts
        assert lines[-1][0] >= p.recorder.times[("close", "/wait")]  # the end came only after the drain


@pytest_twisted.ensureDeferred
async def test_hub_status_shows_queue_in_flight_per_worker_and_totals() -> None:
    hub = await start_hub(reactor, HubConfig(admin=LOOPBACK, drain_timeout=5.0))
    status_url = f"http://127.0.0.1:{port_of(hub.service.admin_listener)}/status"
    recorder = Recorder()
    worker = None
    try:
        first = deferToThread(get, hub.url("/wait"))
        await wait_until(reactor, lambda: hub.service.hub.queue.waiting == 1, timeout=5)
        await sleep(reactor, 0.2)
        status = json.loads((await fetch(status_url, JSON)).body)
        assert status["queue_length"] == 1 and status["oldest_wait"] >= 0.2
        assert (status["in_flight"], status["ready_connections"], status["worker_connections"]) == (0, 0, 0)

        worker = await start_worker(reactor, make_app(recorder), hub, WorkerConfig(threads=1), wait=False)
        await wait_until(reactor, lambda: "/wait" in recorder.kinds("start"), timeout=5)
        second = deferToThread(get, hub.url("/wait"))
        await wait_until(reactor, lambda: hub.service.hub.queue.waiting == 1, timeout=5)

        reply = await fetch(status_url, JSON)
        assert reply.headers["content-type"] == "application/json"
        status = json.loads(reply.body)
        assert status["state"] == "running"
        assert status["queue_length"] == 1 and status["in_flight"] == 1
        [(address, count)] = status["in_flight_by_worker"].items()
        assert address.startswith("127.0.0.1:") and count == 1

        text = (await fetch(status_url)).body.decode()
        assert "pothead hub: running" in text
        assert "queue: 1 waiting" in text
        assert "jobs in flight: 1" in text and address in text

        recorder.release.set()
        assert (await first).status == 200 and (await second).status == 200
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1, timeout=5)
        status = json.loads((await fetch(status_url + "?format=json")).body)
        assert (status["queue_length"], status["in_flight"], status["ready_connections"]) == (0, 0, 1)
        assert status["in_flight_by_worker"] == {}
        assert status["totals"]["worker_connected"] >= 1
    finally:
        recorder.release.set()
        if worker is not None:
            await worker.stopService()
        await hub.service.stopService()


def test_reference_command_line_serves_inspection_and_redirects(tmp_path: Path) -> None:
    """``python -m pothead.worker --redirect-response ... --inspection-port ...`` behind ``twistd pothead-hub --admin``."""
    (tmp_path / "redirapp.py").write_text(APP_SOURCE)
    consumer, workers, admin, redirect, inspection = (free_port() for _ in range(5))
    env = clean_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parent.parent)])})
    hub = spawn(
        "hub",
        [TWISTD, "-n", "--pidfile=", "pothead-hub", "--listen", f"tcp:{consumer}:interface=127.0.0.1",
         "--workers", f"tcp:{workers}:interface=127.0.0.1", "--admin", f"tcp:{admin}:interface=127.0.0.1"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    worker = None
    try:
        wait_for_log(hub, "listening for admin", timeout=20)
        worker = spawn(
            "worker",
            [sys.executable, "-m", "pothead.worker",
             "--connect", f"127.0.0.1:{workers}", "--workers", "1",
             "--redirect-response", f"tcp:{redirect}:interface=127.0.0.1",
             "--inspection-port", f"tcp:{inspection}:interface=127.0.0.1", "redirapp:app"],
            cwd=tmp_path, env=env,
        )  # fmt: skip
        wait_for_log(worker, "listening for inspection", timeout=20)

        def ready() -> bool:
            status = json.loads(get(f"http://127.0.0.1:{admin}/status", headers=JSON).body)
            return bool(status["ready_connections"] == 1)

        wait_for(ready, 20, "the worker connects to the hub")
        reply = get(f"http://127.0.0.1:{consumer}/small")
        assert reply.status == 303, hub.describe() + worker.describe()
        assert reply.headers["location"].startswith(f"http://127.0.0.1:{redirect}/")
        assert get(reply.headers["location"]).body == b"small\n"
        assert "pothead worker: running" in get(f"http://127.0.0.1:{inspection}/inspect").body.decode()

        lines: list[str] = []

        def watch() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", inspection, timeout=20)
            try:
                connection.request("GET", "/apocalypse")
                response = connection.getresponse()
                while True:
                    line = response.readline()
                    if not line:
                        return
                    lines.append(line.decode())
            finally:
                connection.close()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_for(lambda: bool(lines), 10, "the first /apocalypse line")
        os.kill(worker.pid, signal.SIGTERM)
        watcher.join(15)
        assert not watcher.is_alive(), lines
        assert lines[0].startswith("Not yet: running") and lines[-1] == "It's time\n", lines
        assert worker.popen.wait(10) == 0, worker.describe()
    finally:
        if worker is not None:
            stop(worker)
        stop(hub)


@pytest.mark.no_reactor
def test_options_are_checked_at_start_up() -> None:
    from pothead.plugin import HubOptions, WorkerOptions

    options = WorkerOptions()
    options.parseOptions(
        ["--redirect-response", "tcp:8081", "--redirect-url-base", "https://media.example.com/x/", "--inspect", "tcp:9081", "a:b"]
    )
    config = options.config
    assert (config.redirect, config.redirect_url_base, config.redirect_expiry, config.inspect) == (
        "tcp:8081", "https://media.example.com/x", 20.0, "tcp:9081",
    )  # fmt: skip
    for bad, message in [
        (["--redirect-url-base", "http://x"], "needs --redirect-response"),
        (["--redirect-response", "tcp:1", "--redirect-url-base", "ftp://x"], "--redirect-url-base"),
        (["--redirect-response", "tcp:1", "--redirect-expiry", "0"], "--redirect-expiry"),
        (["--redirect-response", "tcp:1", "--redirect-expiry", "never"], "--redirect-expiry"),
    ]:
        with pytest.raises(SystemExit) as raised:
            WorkerOptions().parseOptions(bad)
        assert message in str(raised.value) and "\n" not in str(raised.value)
    hub = HubOptions()
    hub.parseOptions(["--admin", "tcp:9080:interface=127.0.0.1"])
    assert hub.config.admin == "tcp:9080:interface=127.0.0.1"
