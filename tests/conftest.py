"""
Shared fixtures.

Reactor tests run under pytest-twisted.  pytest-twisted neither times out nor
notices a dirty reactor, so: pytest-timeout bounds every test (setup.cfg), and
the autouse ``clean_reactor`` fixture fails a test that leaves timers behind
or listening ports open.
"""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

# Timers that belong to the reactor itself, not to a test.
_ALLOWED_DELAYED = ("_runUntilCurrent", "Cooperator", "_tick", "threadpool", "ThreadPool")


def _spin(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _leftover_calls() -> list[str]:
    leftovers = []
    for call in reactor.getDelayedCalls():
        text = repr(call)
        if not any(name in text for name in _ALLOWED_DELAYED):
            leftovers.append(text)
    return leftovers


def _listening_ports() -> list[str]:
    from twisted.internet.tcp import Port

    return [repr(r) for r in reactor.getReaders() if isinstance(r, Port)]


@pytest.fixture(autouse=True)
def clean_reactor(request: pytest.FixtureRequest):
    """Fail a reactor test that leaves DelayedCalls or listening ports behind."""
    before_ports = set(_listening_ports())
    yield
    if "no_reactor" in request.keywords:
        return
    # Let connection teardown and callLater(0)s run.
    pytest_twisted.blockon(_spin(0.05))
    leftovers = _leftover_calls()
    ports = set(_listening_ports()) - before_ports
    for call in reactor.getDelayedCalls():
        if repr(call) in leftovers:
            call.cancel()
    gc.collect()
    assert not leftovers, f"test left DelayedCalls behind: {leftovers}"
    assert not ports, f"test left ports listening: {ports}"
