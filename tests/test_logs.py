"""
Log formatting fast paths (pothead.logs): the output must be exactly what
twisted.logger's own formatters write, only cheaper.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import pytest
from twisted.logger import FileLogObserver, LogLevel, LogPublisher, jsonFileLogObserver, textFileLogObserver
from twisted.python.failure import Failure

from pothead.logs import JSONLinesObserver, speed_up_text_logs

pytestmark = pytest.mark.no_reactor


def _events() -> list[dict[str, object]]:
    # Pre-formatted events (the fast path), with a newline in the text, at
    # several times within and across seconds; ordinary events, one with its
    # own system and one with a failure take the original path.
    base = {"log_namespace": "pothead.test", "log_level": LogLevel.info}
    events: list[dict[str, object]] = []
    for when in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_784_000_000.25):
        events += [
            {**base, "log_format": "{log_text}", "log_text": f"[rid] GET /a 200 at {when}", "log_time": when},
            {**base, "log_format": "{log_text}", "log_text": "two\nlines", "log_level": LogLevel.warn, "log_time": when},
            {**base, "log_format": "plain {what}", "what": "event", "log_time": when},
            {**base, "log_format": "{log_text}", "log_text": "own system", "log_system": "custom", "log_time": when},
        ]
    try:
        1 / 0
    except ZeroDivisionError:
        events.append({**base, "log_format": "{log_text}", "log_text": "failed", "log_failure": Failure(), "log_time": 1.5})
    return events


def _text_output(speed_up: bool) -> tuple[str, int]:
    out = io.StringIO()
    publisher = LogPublisher(textFileLogObserver(out))
    changed = speed_up_text_logs(publisher) if speed_up else 0
    for event in _events():
        publisher(event)
    return out.getvalue(), changed


def test_fast_text_formatter_writes_exactly_what_twisted_writes() -> None:
    slow, _ = _text_output(speed_up=False)
    fast, changed = _text_output(speed_up=True)
    assert changed == 1
    assert fast == slow
    assert "[pothead.test#info] [rid] GET /a 200" in fast


def test_speed_up_leaves_other_observers_alone_and_is_idempotent() -> None:
    text = textFileLogObserver(io.StringIO())
    json_observer = jsonFileLogObserver(io.StringIO())
    publisher = LogPublisher(text, json_observer)
    original_json_format = json_observer.formatEvent
    assert speed_up_text_logs(publisher) == 1
    assert speed_up_text_logs(publisher) == 0  # already fast
    assert json_observer.formatEvent is original_json_format


def test_speed_up_refuses_a_formatter_it_cannot_reproduce() -> None:
    # A text observer with another time format: the fast path would differ, so it is not installed.
    observer = textFileLogObserver(io.StringIO(), timeFormat="%H:%M")
    original = observer.formatEvent
    assert speed_up_text_logs(LogPublisher(observer)) == 0
    assert observer.formatEvent is original
    assert isinstance(observer, FileLogObserver)


def test_json_lines_time_and_message() -> None:
    out = io.StringIO()
    observer = JSONLinesObserver(out)
    base = {"log_namespace": "pothead.test", "log_level": LogLevel.info}
    for when in (1_700_000_000.0, 1_700_000_000.9996, 1_784_000_000.123456):
        observer({**base, "log_format": "{log_text}", "log_text": "pre-formatted", "request_id": "r1", "log_time": when})
        observer({**base, "log_format": "ordinary {n}", "n": 3, "log_time": when})
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    expected_times = [
        datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
        for t in (1_700_000_000.0, 1_700_000_000.9996, 1_784_000_000.123456)
        for _ in range(2)
    ]
    assert [r["time"] for r in records] == expected_times
    assert [r["message"] for r in records[:2]] == ["pre-formatted", "ordinary 3"]
    assert records[0]["request_id"] == "r1" and "log_text" not in records[0]
