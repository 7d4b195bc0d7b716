# pothead — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TWISTD := $(VENV)/bin/twistd
HUB_PORT    ?= 8080
WORKER_PORT ?= 4040
REF_VENV    ?= .venv-reference

.PHONY: demo test venv test-venv reference clean lint typecheck test-tools

# The package is installed "compat"-editable: setuptools' default editable
# mode is an import hook that hides twisted/plugins/ from twistd's plugin scan.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

# The original POTHEAD 0.10.6, in a venv of its own, as an interoperability peer.
# Its hub hangs with aiohttp newer than 3.10.11.
$(REF_VENV)/.installed:
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --quiet 'pothead==0.10.6' 'aiohttp==3.10.11'
	touch $@

venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test
reference: $(REF_VENV)/.installed

demo: $(VENV)/.installed
	@$(PY) -m pothead.demo_runner --python $(PY) --hub-port $(HUB_PORT) --worker-port $(WORKER_PORT)

# tests/test_systemd.py runs `systemd-analyze verify` on the unit files (Debian's
# systemd package) and checks their system call filter with strace.  Installed
# only when missing, and only as root with apt-get (CI: Debian bookworm as root);
# `apt-get update` only if the first install attempt fails.  Elsewhere those
# tests are skipped -- except as root, where a missing systemd-analyze fails them.
test-tools:
	@missing=""; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
	  else \
	    echo "note:$$missing not installed (needs root and apt-get); the tests using them are skipped"; \
	  fi; \
	fi

test: $(VENV)/.installed-test $(REF_VENV)/.installed test-tools
	POTHEAD_REFERENCE_PYTHON=$(abspath $(REF_VENV))/bin/python \
	POTHEAD_REQUIRE_SYSTEMD_ANALYZE=$$([ "$$(id -u)" = 0 ] && echo 1) \
	$(PY) -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy pothead

clean:
	rm -rf $(VENV) $(REF_VENV) build *.egg-info .pytest_cache .mypy_cache

# -- benchmarks against the peers (issue 7) --------------------------------------
# `make bench` (~15 min) writes bench/RESULTS.md and bench/plots/; `make bench-quick`
# (~3 min) is a smoke run into bench/out/quick/.  Loopback only, bounded.  Needs
# HAProxy and wrk (Debian's; installed when missing, as root, `apt-get update` only
# if the first attempt fails), the original POTHEAD (the `reference` venv) and
# matplotlib/numpy (the `bench` extra) for the plots.
.PHONY: bench bench-quick bench-tools

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install --quiet -e '.[bench]' --config-settings editable_mode=compat
	touch $@

bench-tools:
	@missing=""; \
	command -v haproxy >/dev/null 2>&1 || missing="$$missing haproxy"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
	  else \
	    echo "bench needs$$missing: install them (apt-get install$$missing) as root" >&2; exit 1; \
	  fi; \
	fi

bench: $(VENV)/.installed-bench $(REF_VENV)/.installed bench-tools
	$(PY) bench/run.py --reference-python $(abspath $(REF_VENV))/bin/python $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench $(REF_VENV)/.installed bench-tools
	$(PY) bench/run.py --quick --reference-python $(abspath $(REF_VENV))/bin/python \
	  --out bench/out/quick --results bench/out/quick/RESULTS.md $(BENCH_ARGS)

# --poll-jobs + wait_for_idle_cpus(1) against --threads 1/2/4/8 on CPU-bound jobs
# (~4 minutes; writes the "Gating (--poll-jobs)" section of bench/RESULTS.md).
.PHONY: bench-gating
bench-gating: $(VENV)/.installed
	$(PY) bench/gating.py $(BENCH_GATING_ARGS)

# The hub under PyPy next to CPython (workload B cost, ~2 minutes).  Debian's
# pypy3 is Python 3.9: Twisted 26.4.0 is the newest for it, and the newest
# cryptography with a PyPy 3.9 wheel is 43.0.3 (so pyOpenSSL < 25).  pothead
# runs from the checkout (bench/pypy/twistd_pothead.py), not installed.
PYPY_VENV ?= .venv-pypy
$(PYPY_VENV)/.installed:
	@command -v pypy3 >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q pypy3 pypy3-venv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q pypy3 pypy3-venv >/dev/null; }; \
	  else echo "pypy3 is missing: apt-get install pypy3 pypy3-venv" >&2; exit 1; fi; }
	pypy3 -m venv $(PYPY_VENV)
	$(PYPY_VENV)/bin/pypy -m pip install --quiet --only-binary cryptography \
	  'twisted==26.4.0' 'pyopenssl<25' 'cryptography==43.0.3' service_identity idna
	touch $@

.PHONY: bench-pypy
bench-pypy: $(VENV)/.installed-bench $(PYPY_VENV)/.installed bench-tools
	$(PY) bench/pypy/measure.py --pypy $(abspath $(PYPY_VENV))/bin/pypy $(BENCH_PYPY_ARGS)
