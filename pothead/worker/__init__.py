"""The pothead worker: serves a WSGI app over connections it opens to hubs."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # ``pothead.worker:demo_app`` is the reference worker's default app name.
    if name == "demo_app":
        from ..demo import app

        return app
    raise AttributeError(name)
