"""
Log output: ``--log-format text`` (twistd's own, one line per event) or
``--log-format json`` (one JSON object per line, for journald / Loki).

Every event of a request carries its ``request_id`` field; the JSON form
keeps such fields as keys, next to the formatted ``message``.  An event
whose format is exactly ``"{log_text}"`` was formatted by its emitter (the
hub's per-request access line, where twisted.logger's pure-Python
formatter was a measurable share of the hub's CPU); ``log_text`` is then
the message and, like every ``log_*`` key, not repeated as a field.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python.components import Componentized
from zope.interface import implementer

_SKIP = {"format", "message", "isError", "system", "why", "failure", "time"}


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out if out is not None else sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time") or 0, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": getattr(level, "name", str(level)),
            "logger": event.get("log_namespace", "-"),
            "message": _message(event).replace("\n", " | "),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()


def _message(event: dict[str, Any]) -> str:
    # Hot events (the hub's access line) arrive pre-formatted as {log_text}.
    if event.get("log_format") == "{log_text}":
        return str(event.get("log_text", ""))
    return formatEvent(event)


def observer_for(log_format: str) -> ILogObserver | None:
    """The observer for ``--log-format`` (None: keep twistd's text output)."""
    if log_format == "json":
        return JSONLinesObserver()
    return None


class LogFormatMixin:
    """
    For services built by a twistd plugin: hand twistd the ``--log-format``
    observer.  twistd makes the plugin's service a child of its Application
    and then uses the Application's ``ILogObserver`` component, if any.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)  # type: ignore[misc]
