"""
``PROMETHEUS_MULTIPROC_DIR`` handling, kept apart from :mod:`pothead.metrics`:
the directory must be wiped *before* any metric is created (metrics open
their files in it when they are defined), so this module imports nothing of
prometheus-client.
"""

from __future__ import annotations

import os
import shutil

from .config import ConfigError

DEFAULT_PORT = 9090


def multiprocess_directory(environ: dict[str, str] | None = None) -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` if set; a missing directory is a start-up error."""
    environ = dict(os.environ) if environ is None else environ
    path = environ.get("PROMETHEUS_MULTIPROC_DIR") or environ.get("prometheus_multiproc_dir")
    if not path:
        return None
    if not os.path.isdir(path):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a directory; create it (it is wiped at start-up) or unset it"
        )
    return path


def wipe(path: str) -> None:
    """Empty the multiprocess directory (the original does the same at start-up)."""
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def metrics_endpoint(option: str | None, environ: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """
    The metrics endpoint and multiprocess directory for a daemon starting now.

    ``--metrics`` wins; with ``PROMETHEUS_MULTIPROC_DIR`` set and no
    ``--metrics``, the original's ``PROMETHEUS_PORT`` (default 9090) is used.
    The directory, if any, is wiped here.
    """
    environ = dict(os.environ) if environ is None else environ
    directory = multiprocess_directory(environ)
    if directory is not None:
        wipe(directory)
        if option is None:
            text = environ.get("PROMETHEUS_PORT", str(DEFAULT_PORT))
            try:
                port = int(text)
            except ValueError:
                raise ConfigError(f"PROMETHEUS_PORT={text!r} is not a port number") from None
            option = f"tcp:{port}"
    return option, directory
