"""
Hardening: hostile consumer input, slow clients, connection caps, misbehaving
workers, worker authentication end to end, TLS on both ports, and generated
byte streams against a running hub (issue 8).

Hostile peers are raw sockets in threads, so every byte the hub answers is
visible; the real worker's app records every request that reaches it, so
"nothing forwarded" is checked where it matters.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from pothead.config import HubConfig, WorkerConfig
from pothead.testing import running_pair, start_hub, start_worker, wait_until


class RecordingApp:
    """A WSGI app remembering every request it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        with self.lock:
            self.seen.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), body))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]


def raw_exchange(port: int, data: bytes, read_for: float = 3.0, pace: float | None = None) -> tuple[bytes, bool]:
    """
    Send ``data`` (one byte every ``pace`` seconds if given), read until the
    hub closes or ``read_for`` passes; return (answer, closed_by_hub).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        deadline = time.monotonic() + read_for
        try:
            if pace is None:
                s.sendall(data)
            else:
                for i in range(len(data)):
                    s.sendall(data[i : i + 1])
                    time.sleep(pace)
        except OSError:
            pass  # the hub may close while we are still sending
        answer = b""
        while True:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return answer, False
            except OSError:
                return answer, True
            if not chunk:
                return answer, True
            answer += chunk


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


GET = b"GET /fine HTTP/1.1\r\nHost: x\r\n"
POST = b"POST /smuggle HTTP/1.1\r\nHost: x\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

HOSTILE = {
    "cl_and_te": (POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400}),
    "two_content_lengths": (POST + b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd" + SMUGGLED, {400}),
    "content_length_list": (POST + b"Content-Length: 4, 40\r\n\r\nabcd" + SMUGGLED, {400}),
    "content_length_sign": (POST + b"Content-Length: +4\r\n\r\nabcd" + SMUGGLED, {400}),
    "te_gzip": (POST + b"Transfer-Encoding: gzip\r\n\r\n" + SMUGGLED, {400, 501}),
    "te_chunked_gzip": (POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n" + SMUGGLED, {400, 501}),
    "te_xchunked": (POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400, 501}),
    "te_twice": (POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED, {400, 501}),
    "te_http10": (b"POST /smuggle HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400}),
    "obs_fold": (GET + b"X-A: one\r\n two\r\n\r\n", {400}),
    "bare_lf": (b"GET /fine HTTP/1.1\nHost: x\nX-A: b\n\n", {400}),
    "bare_lf_in_headers": (GET + b"X-A: b\nX-B: c\r\n\r\n", {400}),
    "space_in_name": (GET + b"X A: b\r\n\r\n", {400}),
    "space_before_colon": (GET + b"Transfer-Encoding : chunked\r\n\r\n", {400}),
    "non_token_name": (GET + b"X(A): b\r\n\r\n", {400}),
    "empty_name": (GET + b": b\r\n\r\n", {400}),
    "control_char_value": (GET + b"X-A: a\x01b\r\n\r\n", {400}),
    "nul_value": (GET + b"X-A: a\x00b\r\n\r\n", {400}),
    "cr_in_value": (GET + b"X-A: a\rb\r\n\r\n", {400}),
    "long_request_line": (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    "long_header_block": (GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(400)) + b"\r\n", {431}),
    "long_header_line": (GET + b"X-A: " + b"v" * 40000 + b"\r\n\r\n", {431}),
    "absurd_chunk_size": (POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc", {400, 413}),
    "negative_chunk_size": (POST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nabc", {400}),
    "chunk_size_junk": (POST + b"Transfer-Encoding: chunked\r\n\r\n5 x\r\nabcde\r\n0\r\n\r\n", {400}),
    "huge_content_length": (POST + b"Content-Length: 99999999999999999999999\r\n\r\nabc", {400, 413}),
    "bad_version": (b"GET /fine HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}),
    "garbage_request_line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", {400}),
}


@pytest.fixture(scope="module")
def _hostile_cases() -> dict[str, tuple[bytes, set[int]]]:
    return HOSTILE


@pytest_twisted.ensureDeferred
async def test_hostile_consumer_input_is_refused_and_never_forwarded() -> None:
    app = RecordingApp()
    hub_config = HubConfig(max_header_bytes=16384, max_body=10**9)
    async with running_pair(app, threads=2, hub_config=hub_config) as pair:
        port = pair.hub.consumer_port
        problems = []
        for name, (data, expected) in HOSTILE.items():
            answer, closed = await deferToThread(raw_exchange, port, data, 3.0)
            status = status_of(answer)
            if status not in expected or not closed:
                problems.append(f"{name}: status {status} closed={closed} answer={answer[:120]!r}")
            if app.seen:
                problems.append(f"{name}: forwarded to the worker: {app.seen}")
                app.seen.clear()
        assert not problems, "\n".join(problems)
        # The hub is unharmed and still forwards normal requests.
        answer, _ = await deferToThread(raw_exchange, port, GET + b"Connection: close\r\n\r\n", 5.0)
        assert status_of(answer) == 200 and answer.endswith(b"ok")
        assert [s[1] for s in app.seen] == ["/fine"]


# -- slow clients, idle connections, connection cap ------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_header_sender_gets_408_and_idle_connections_time_out() -> None:
    app = RecordingApp()
    config = HubConfig(header_timeout=0.6, consumer_idle_timeout=0.8)
    async with running_pair(app, hub_config=config) as pair:
        port = pair.hub.consumer_port
        # One byte every 0.1 s: each byte resets the idle timer, only the
        # header timeout stops it.
        started = time.monotonic()
        answer, closed = await deferToThread(raw_exchange, port, GET + b"X-Slow: " + b"a" * 40 + b"\r\n\r\n", 6.0, 0.1)
        took = time.monotonic() - started
        assert status_of(answer) == 408 and closed, answer
        assert took < 4.0
        assert app.seen == []
        # A connection that never sends anything is closed by the idle timeout.
        started = time.monotonic()
        answer, closed = await deferToThread(raw_exchange, port, b"", 5.0)
        assert closed and answer == b"" and 0.5 < time.monotonic() - started < 4.0
        # A keep-alive connection idle after a request is closed too (no 408 on it).
        answer, closed = await deferToThread(raw_exchange, port, GET + b"\r\n", 5.0)
        assert status_of(answer) == 200 and closed and b"408" not in answer
        # A fast client on a hub with a header timeout is not hurt.
        response = await treq.get(pair.url("/fast"), persistent=False)
        assert response.code == 200 and await response.content() == b"ok"


@pytest_twisted.ensureDeferred
async def test_connection_cap() -> None:
    app = RecordingApp()
    async with running_pair(app, hub_config=HubConfig(max_connections=3, consumer_idle_timeout=10)) as pair:
        port = pair.hub.consumer_port
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            await sleep_a_bit(0.3)
            answer, closed = await deferToThread(raw_exchange, port, GET + b"\r\n", 3.0)
            assert status_of(answer) == 503 and closed, answer
            assert app.seen == []
        finally:
            for s in held:
                s.close()
        # Below the cap again: served.
        for _ in range(50):
            answer, closed = await deferToThread(raw_exchange, port, GET + b"Connection: close\r\n\r\n", 3.0)
            if status_of(answer) == 200:
                break
            await sleep_a_bit(0.05)
        assert status_of(answer) == 200


def sleep_a_bit(seconds: float) -> Any:
    from pothead.testing import sleep

    return sleep(reactor, seconds)


# -- worker authentication end to end -----------------------------------------------

TOKEN = b"hardening-token-0123456789abcdef"


@pytest_twisted.ensureDeferred
async def test_worker_token_end_to_end() -> None:
    app = RecordingApp()
    hub = await start_hub(reactor, HubConfig(worker_token=TOKEN, queue_timeout=30))
    workers = []
    try:
        good = await start_worker(reactor, app, hub, WorkerConfig(worker_token=TOKEN))
        workers.append(good)
        response = await treq.get(hub.url("/authed"), persistent=False)
        assert response.code == 200 and await response.content() == b"ok"
        assert [s[1] for s in app.seen] == ["/authed"]
        await good.stopService()
        workers.remove(good)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 0)

        # Wrong token: refused, counted on both sides, backs off, never gets a job.
        stranger_app = RecordingApp()
        refused_before = hub.service.hub.totals["worker_refused"]
        bad = await start_worker(
            reactor, stranger_app, hub, WorkerConfig(worker_token=b"x" * 32, reconnect_initial=0.2, reconnect_max=1), wait=False
        )
        workers.append(bad)
        waiting = treq.get(hub.url("/secret"), persistent=False)
        target = bad.runtime.targets[0]
        await wait_until(reactor, lambda: target.failures >= 2, timeout=10)
        assert hub.service.hub.totals["worker_refused"] >= refused_before + 2
        assert target.delay() > 0  # backing off, not spinning
        # Backoff: far fewer attempts than a tight loop would make in this time.
        await sleep_a_bit(1.0)
        assert hub.service.hub.totals["worker_refused"] - refused_before < 10
        assert stranger_app.seen == [] and hub.service.hub.queue.waiting == 1
        await bad.stopService()
        workers.remove(bad)

        # The right worker comes back and takes the queued job.
        good2 = await start_worker(reactor, app, hub, WorkerConfig(worker_token=TOKEN))
        workers.append(good2)
        response = await waiting
        assert response.code == 200 and await response.content() == b"ok"
        assert stranger_app.seen == []
    finally:
        for w in workers:
            await w.stopService()
        await hub.service.stopService()


@pytest_twisted.ensureDeferred
async def test_worker_with_token_against_hub_without_one_fails_clearly() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    messages: list[str] = []

    def observer(event: dict) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    app = RecordingApp()
    hub = await start_hub(reactor, HubConfig())
    worker = await start_worker(
        reactor, app, hub, WorkerConfig(worker_token=TOKEN, reconnect_initial=0.2, reconnect_max=1), wait=False
    )
    try:
        target = worker.runtime.targets[0]
        await wait_until(reactor, lambda: target.failures >= 1, timeout=10)
        assert worker.runtime.idle_connections == 0 and app.seen == []
        # The operator is told why: the hub did not switch protocols.
        assert any("PTTH" in m or "upgrade" in m for m in messages if "hub" in m), messages[-10:]
        assert not any(TOKEN.decode() in m for m in messages)
    finally:
        globalLogPublisher.removeObserver(observer)
        await worker.stopService()
        await hub.service.stopService()


# -- misbehaving workers ---------------------------------------------------------


def scripted_worker(port: int, reply: Any, hold: float = 5.0) -> bool:
    """
    Connect to the worker port, wait for one request head, then call
    ``reply(sock)``; return True if the hub closed the connection afterwards.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=hold) as s:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return True
            data += chunk
        try:
            reply(s)
        except OSError:
            return True  # the hub cut us off while we were still sending
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False


def endless_head(s: socket.socket) -> None:
    s.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(100000):  # ~2.5 MB of header lines, unless cut off
        s.sendall(b"X-Never-Ending-%d: yes\r\n" % i)


def oversized_body(s: socket.socket) -> None:
    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhelloEXTRA BYTES HTTP/1.1 200 OK\r\n\r\n")


def stall_mid_body(s: socket.socket) -> None:
    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    time.sleep(3)


@pytest.mark.parametrize(
    "name, reply, expected",
    [
        ("garbage", lambda s: s.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n"), 502),
        ("endless_head", endless_head, 502),
        ("oversized_body", oversized_body, 200),
    ],
)
@pytest_twisted.ensureDeferred
async def test_misbehaving_worker(name: str, reply: Any, expected: int) -> None:
    app = RecordingApp()
    hub = await start_hub(reactor, HubConfig(queue_timeout=10))
    try:
        fake = deferToThread(scripted_worker, hub.worker_port, reply)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        response = await treq.get(hub.url(f"/{name}"), persistent=False)
        body = await response.content()
        assert response.code == expected, body
        if name == "oversized_body":
            assert body == b"hello"  # exactly Content-Length bytes
        closed = await fake
        assert closed, "the hub kept the misbehaving worker's connection"
        assert hub.service.hub.queue.ready == 0
        # The hub is unharmed: a real worker serves the next request.
        worker = await start_worker(reactor, app, hub)
        try:
            response = await treq.get(hub.url("/after"), persistent=False)
            assert response.code == 200 and await response.content() == b"ok"
        finally:
            await worker.stopService()
    finally:
        await hub.service.stopService()


@pytest_twisted.ensureDeferred
async def test_worker_stalling_mid_body_does_not_hold_up_others() -> None:
    app = RecordingApp()
    hub = await start_hub(reactor, HubConfig(queue_timeout=10, drain_timeout=0.5))
    try:
        fake = deferToThread(scripted_worker, hub.worker_port, stall_mid_body, 5.0)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        stalled = treq.get(hub.url("/stalls"), persistent=False)
        response = await stalled
        assert response.code == 200
        partial = response.content()
        worker = await start_worker(reactor, app, hub, WorkerConfig(threads=2))
        try:
            for i in range(3):
                other = await treq.get(hub.url(f"/other{i}"), persistent=False)
                assert other.code == 200 and await other.content() == b"ok"
        finally:
            await worker.stopService()
        # When the stalled worker finally goes, the consumer sees an abort, not a clean short body.
        with pytest.raises(Exception):
            await partial
        await fake
    finally:
        await hub.service.stopService()


# -- TLS on both ports ---------------------------------------------------------------


def make_pki(directory: Any) -> dict[str, str]:
    """A CA, a hub certificate for 127.0.0.1/localhost, a worker client
    certificate, and an unrelated CA; returns file names."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, str] = {}

    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.write_bytes(data)
        files[name] = str(path)
        return str(path)

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def ca(name: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(name: str, ca_key: Any, ca_cert: Any, usage: Any, san: list[Any]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    ca_key, ca_cert = ca("pothead test CA")
    write("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    other_key, other_cert = ca("some other CA")
    write("other-ca.pem", other_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = leaf(
        "hub", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    write("hub.crt", cert)
    write("hub.key", key)
    cert, key = leaf("worker-1", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    write("worker.crt", cert)
    write("worker.key", key)
    cadir = directory / "worker-ca"
    cadir.mkdir()
    # Twisted's ssl: server endpoint loads every *.pem in caCertsDir (no c_rehash names needed).
    (cadir / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["cadir"] = str(cadir)
    return files


async def start_tls_hub(pki: dict[str, str], *, client_certs: bool) -> Any:
    from pothead.hub.service import HubService
    from pothead.testing import RunningHub

    ssl = f"ssl:0:interface=127.0.0.1:privateKey={pki['hub.key']}:certKey={pki['hub.crt']}"
    workers = ssl + (f":caCertsDir={pki['cadir']}" if client_certs else "")
    service = HubService(HubConfig(listen=(ssl,), workers=(workers,), queue_timeout=20, drain_timeout=0.5), reactor)
    service.startService()
    await service.when_listening()
    return RunningHub(
        service, service.consumer_listeners[0].port.getHost().port, service.worker_listeners[0].port.getHost().port
    )


def https_get(port: int, path: str, ca: str) -> tuple[int, bytes]:
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=ca)
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_tls_both_ports_and_client_certificates(tmp_path) -> None:
    pki = make_pki(tmp_path)
    app = RecordingApp()
    quick = dict(reconnect_initial=0.2, reconnect_max=1.0)

    # Hub certificate verified by the worker; consumers speak HTTPS.
    hub = await start_tls_hub(pki, client_certs=False)
    try:
        worker = await start_worker(reactor, app, f"localhost:{hub.worker_port}", WorkerConfig(tls_ca=pki["ca.pem"]))
        try:
            status, body = await deferToThread(https_get, hub.consumer_port, "/over-tls", pki["ca.pem"])
            assert (status, body) == (200, b"ok")
            assert [s[1] for s in app.seen] == ["/over-tls"]
        finally:
            await worker.stopService()
        # A worker trusting another CA refuses the hub: no connection, failures counted.
        stranger_app = RecordingApp()
        stranger = await start_worker(
            reactor, stranger_app, f"localhost:{hub.worker_port}", WorkerConfig(tls_ca=pki["other-ca.pem"], **quick),
            wait=False,
        )
        try:
            # The TCP connect succeeds, the TLS verification fails: the hub
            # never counts the connection ready (it waits for the TLS
            # handshake), and the worker counts failed attempts and backs off.
            attempts_before = hub.service.hub.totals["worker_connected"]
            for _ in range(20):
                await sleep_a_bit(0.05)
                assert hub.service.hub.queue.ready == 0
            target = stranger.runtime.targets[0]
            await wait_until(reactor, lambda: target.failures >= 2, timeout=5)
            assert hub.service.hub.totals["worker_connected"] - attempts_before < 15  # backoff, no tight loop
            assert stranger_app.seen == []
        finally:
            await stranger.stopService()
    finally:
        await hub.service.stopService()

    # Requiring worker client certificates is NOT tested: Twisted's ssl:
    # server endpoint string takes no caCertsDir (only the client side does),
    # so the hub cannot demand client certificates through --workers today.


@pytest_twisted.ensureDeferred
async def test_worker_stall_timeout_aborts_the_stalled_response_only() -> None:
    hub = await start_hub(reactor, HubConfig(queue_timeout=10, drain_timeout=0.5, worker_stall_timeout=0.5))
    try:
        fake = deferToThread(scripted_worker, hub.worker_port, stall_mid_body, 5.0)
        await wait_until(reactor, lambda: hub.service.hub.queue.ready == 1)
        started = reactor.seconds()
        response = await treq.get(hub.url("/stalls"), persistent=False)
        assert response.code == 200
        with pytest.raises(Exception):
            await response.content()  # aborted, not a clean short body
        waited = reactor.seconds() - started
        assert 0.4 < waited < 2.5, waited
        assert await fake is True  # the hub dropped the stalled worker's connection
        assert hub.service.hub.totals["request"] == 1
    finally:
        await hub.service.stopService()


@pytest_twisted.ensureDeferred
async def test_worker_stall_timeout_ignores_a_slow_consumer() -> None:
    # 8 MB through a consumer that reads nothing for 1.5 s: the hub pauses the
    # worker (backpressure), which must not count as the worker stalling.
    def big(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", str(8 * 1024 * 1024))])
        return (b"x" * 65536 for _ in range(128))

    async with running_pair(big, hub_config=HubConfig(worker_stall_timeout=0.5)) as pair:
        def slow_read() -> int:
            with socket.create_connection(("127.0.0.1", pair.hub.consumer_port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                time.sleep(1.5)
                total = 0
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        return total
                    total += len(chunk)

        received = await deferToThread(slow_read)
        assert received > 8 * 1024 * 1024  # headers + the whole body
