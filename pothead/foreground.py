"""
Running a service in the foreground without twistd, for the reference
compatible command lines (``python3 -m pothead.server`` / ``pothead.worker``).

SIGTERM and SIGINT stop the reactor, which stops the service first (so the
hub and the worker drain exactly as under twistd).  With ``$NOTIFY_SOCKET``
set they notify systemd as under twistd (:mod:`pothead.sdnotify`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from twisted.application.service import IService
from twisted.logger import globalLogBeginner, textFileLogObserver


def run(make_service: Callable[[Any], IService], program: str) -> int:
    """Build the service with the reactor, run until stopped; returns an exit status."""
    from twisted.internet import reactor

    from .config import ConfigError

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    try:
        service = make_service(reactor)
    except ConfigError as e:
        print(f"{program}: {e}", file=sys.stderr)
        return 2
    from .sdnotify import attach_notifier

    attach_notifier(service, reactor)
    failed: list[str] = []

    def start() -> None:
        try:
            service.startService()
        except Exception as e:  # a listener that cannot bind, for example
            failed.append(str(e))
            reactor.stop()
            return
        finally:
            # Registered after startService, so the systemd notifier's own
            # "before shutdown" trigger (added while it started) runs first
            # and STOPPING=1 goes out before the drain.
            reactor.addSystemEventTrigger("before", "shutdown", lambda: service.stopService() if service.running else None)
        when_listening = getattr(service, "when_listening", None)
        if when_listening is not None:
            def cannot_listen(failure: Any) -> None:
                failed.append(failure.getErrorMessage())
                reactor.stop()

            when_listening().addErrback(cannot_listen)

    reactor.callWhenRunning(start)
    reactor.run()
    if failed:
        print(f"{program}: {failed[0]}", file=sys.stderr)
        return 1
    return 0
