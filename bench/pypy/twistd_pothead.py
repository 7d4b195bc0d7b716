"""
``twistd`` with pothead's two plugins, for an interpreter that cannot install
pothead (PyPy 3.9: setup.cfg says ``python_requires >= 3.10``)::

    PYTHONDONTWRITEBYTECODE=1 .venv-pypy/bin/pypy bench/pypy/twistd_pothead.py -n --pidfile= pothead-hub ...

pothead is imported from this checkout (put first on ``sys.path``), and the
plugin module ``twisted/plugins/pothead_plugins.py`` is loaded by file name and
handed to twistd directly, so twistd scans no plugin directory and writes no
``dropin.cache`` anywhere.  Everything else is plain twistd.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("pothead_plugins", REPO / "twisted" / "plugins" / "pothead_plugins.py")
assert _spec is not None and _spec.loader is not None
_plugins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_plugins)

from twisted.application import app  # noqa: E402

app.ServerOptions._getPlugins = staticmethod(lambda interface, package=None: [_plugins.hub, _plugins.worker])

from twisted.scripts.twistd import run  # noqa: E402

if __name__ == "__main__":
    run()
