"""
A plain HTTP server for HAProxy's backends: ``bench/jobapp.py`` served by
twisted.web's WSGI container on its own thread pool, on 127.0.0.1:PORT.

The same server stack as a pothead worker (twisted.web + WSGIResource), so the
HAProxy runs differ from the pothead runs by the balancer only.  It accepts
any number of concurrent requests (HTTP/1.1 keep-alive); the app's
per-process lock makes them run one at a time, as on a single-job worker.

    .venv/bin/python bench/backend.py --port 18001
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobapp import app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=256, help="most concurrent requests (they queue on the job lock)")
    args = parser.parse_args()
    pool = ThreadPool(minthreads=1, maxthreads=args.threads, name="jobapp")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    site = Site(WSGIResource(reactor, pool, app))
    site.log = lambda request: None  # no access log: the pothead worker logs none either
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    print(f"backend listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
