"""The pothead worker: serves a WSGI app over connections it opens to hubs."""

from __future__ import annotations

from typing import Any

_demo_app: Any = None


def __getattr__(name: str) -> Any:
    # ``pothead.worker:demo_app`` is the reference worker's default app: the
    # demo app, gated on one idle CPU for --poll-jobs.
    global _demo_app
    if name == "demo_app":
        if _demo_app is None:
            from ..demo import app
            from ..gating import wait_for_idle_cpus

            def demo_app(environ: Any, start_response: Any) -> Any:
                return app(environ, start_response)

            demo_app.wait_for_slot = wait_for_idle_cpus(1)  # type: ignore[attr-defined]
            _demo_app = demo_app
        return _demo_app
    raise AttributeError(name)
