"""
The hub's own Python cost per request, without sockets: a consumer channel
and a worker connection on in-memory transports, driven in a loop.  A
development tool for profiling the hub (no kernel, no other processes, so
it is repeatable on a busy machine)::

    .venv/bin/python bench/hub_micro.py [--requests 20000] [--profile]

Prints microseconds per request (a GET answered by a keep-alive worker with
a small Content-Length body, the access line logged to /dev/null as
twistd's text observer would); ``--profile`` adds the top functions by own
time from cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, textFileLogObserver

from pothead.config import HubConfig
from pothead.hub.front import ConsumerSite
from pothead.hub.dispatch import Hub
from pothead.hub.workers import WorkerFactory

REQUEST = b"GET /job?ms=0 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nServer: TwistedWeb/26.10.0\r\n"
    b"Date: Fri, 27 Nov 2026 07:24:58 GMT\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nok 12345"
)


class Transport(StringTransport):
    def abortConnection(self) -> None:
        self.loseConnection()


def setup() -> tuple[object, object, Transport, Transport]:
    hub = Hub(HubConfig(), reactor)
    site = ConsumerSite(hub)
    consumer = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    consumer_transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    consumer.makeConnection(consumer_transport)
    worker = WorkerFactory(hub).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50001))
    worker_transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50001))
    worker.makeConnection(worker_transport)
    return consumer, worker, consumer_transport, worker_transport


def run(n: int) -> float:
    consumer, worker, ct, wt = setup()
    start = time.perf_counter()
    for _ in range(n):
        consumer.dataReceived(REQUEST)  # type: ignore[attr-defined]
        if not wt.value():
            raise SystemExit("the hub did not dispatch the request")
        wt.clear()
        worker.dataReceived(RESPONSE)  # type: ignore[attr-defined]
        if b"ok 12345" not in ct.value():
            raise SystemExit(f"no response to the consumer: {ct.value()!r}")
        ct.clear()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sink = open("/dev/null", "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sink)], redirectStandardIO=False)
    run(1000)  # warm up
    print(f"{run(args.requests):.1f} us per request (best of 3: ", end="")
    print(f"{min(run(args.requests) for _ in range(3)):.1f})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.requests)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
        print(out.getvalue())


if __name__ == "__main__":
    main()
