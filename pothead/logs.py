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

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, formatEvent, formatTime, globalLogPublisher
from twisted.python.components import Componentized
from zope.interface import implementer

_SKIP = {"format", "message", "isError", "system", "why", "failure", "time"}


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out if out is not None else sys.stdout
        self._second = -1
        self._stamp = ""

    def _time(self, when: float) -> str:
        """ISO 8601 in UTC with milliseconds; the date part computed once per second."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        millis = min(999, int((when - second) * 1000))
        return f"{self._stamp}.{millis:03d}+00:00"

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": self._time(event.get("log_time") or 0.0),
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


def _fast_text_formatter(original: Any) -> Any:
    """
    ``original`` (a text observer's formatter, twistd's classic
    ``TIME [namespace#level] text`` line) with a fast path for pre-formatted
    events: the timestamp is computed once per second instead of per line.
    None if the fast path would not give exactly the original's output.
    """
    cache: dict[int, str] = {}

    def fast(event: dict[str, Any]) -> Any:
        when = event.get("log_time")
        level = event.get("log_level")
        if (
            event.get("log_format") != "{log_text}"
            or when is None
            or level is None
            or "log_failure" in event
            or "log_system" in event
        ):
            return original(event)
        second = int(when)
        stamp = cache.get(second)
        if stamp is None:
            cache.clear()
            stamp = cache[second] = formatTime(float(second))
        text = str(event.get("log_text", "")).replace("\n", "\n\t")
        return f"{stamp} [{event.get('log_namespace', '-')}#{level.name}] {text}\n"

    fast.pothead_fast = True  # type: ignore[attr-defined]
    for when in (1_700_000_000.25, 1_700_000_000.75, 1_784_000_000.5):
        sample = {
            "log_format": "{log_text}",
            "log_text": "[id] GET /x 200\nsecond line",
            "log_time": when,
            "log_level": LogLevel.info,
            "log_namespace": "pothead.check",
        }
        try:
            if fast(dict(sample)) != original(dict(sample)):
                return None
        except Exception:
            return None
    return fast


def speed_up_text_logs(publisher: Any = globalLogPublisher) -> int:
    """
    Give twistd's text observers (``--log-format text``) the fast path of
    :func:`_fast_text_formatter` for pre-formatted events (the hub's access
    line, the worker's job lines): twisted.logger's classic formatter
    computes a time zone and a timestamp per line, ~20 % of the hub's
    Python time per request.  The output is unchanged, byte for byte (checked
    before the switch); observers that are not plain text file observers
    are left alone.  Returns the number of observers changed.
    """
    changed = 0
    for observer in list(getattr(publisher, "_observers", [])):
        if not isinstance(observer, FileLogObserver):
            continue
        original = getattr(observer, "formatEvent", None)
        if original is None or getattr(original, "pothead_fast", False):
            continue
        fast = _fast_text_formatter(original)
        if fast is not None:
            observer.formatEvent = fast
            changed += 1
    return changed


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
