# pothead — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TWISTD := $(VENV)/bin/twistd
HUB_PORT    ?= 8080
WORKER_PORT ?= 4040
REF_VENV    ?= .venv-reference

.PHONY: demo test venv test-venv reference clean lint typecheck

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

test: $(VENV)/.installed-test $(REF_VENV)/.installed
	POTHEAD_REFERENCE_PYTHON=$(abspath $(REF_VENV))/bin/python $(PY) -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy pothead

clean:
	rm -rf $(VENV) $(REF_VENV) build *.egg-info .pytest_cache .mypy_cache
