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
    name = "PROMETHEUS_MULTIPROC_DIR"
    if name not in environ and "prometheus_multiproc_dir" in environ:
        name = "prometheus_multiproc_dir"  # the deprecated spelling prometheus-client still honours
    path = environ.get(name)
    if path is None:
        return None
    if not path:
        # prometheus-client switches to multiprocess mode whenever the variable
        # exists, and would then write its files into the current directory.
        raise ConfigError(f"{name} is set but empty; point it at a directory (it is wiped at start-up) or unset it")
    if not os.path.isdir(path):
        raise ConfigError(f"{name}={path!r} is not a directory; create it (it is wiped at start-up) or unset it")
    return path


def wipe(path: str) -> None:
    """Empty the multiprocess directory (the original does the same at start-up)."""
    try:
        for entry in os.listdir(path):
            full = os.path.join(path, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
    except OSError as e:
        raise ConfigError(f"cannot wipe PROMETHEUS_MULTIPROC_DIR {path!r}: {e.strerror or e}") from None


def metrics_endpoint(option: str | None, environ: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """
    The metrics endpoint and multiprocess directory for a daemon starting now.

    ``--metrics`` wins; with ``PROMETHEUS_MULTIPROC_DIR`` set and no
    ``--metrics``, the original's ``PROMETHEUS_PORT`` (default 9090) is used,
    on every interface unless ``PROMETHEUS_ADDR`` names one.
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
                port = -1
            if not 0 <= port <= 65535:
                raise ConfigError(f"PROMETHEUS_PORT={text!r} is not a port number") from None
            option = f"tcp:{port}"
            # Like the original (prometheus-client's start_http_server), every
            # interface by default; PROMETHEUS_ADDR (our addition) narrows it.
            address = environ.get("PROMETHEUS_ADDR", "").strip()
            if address:
                option += ":interface=" + address.strip("[]").replace(":", "\\:")
    return option, directory
