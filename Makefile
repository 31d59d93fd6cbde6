# Two commands do all the set-up on a fresh machine (see README):
#   make demo   create .venv if there is none, install, run the demo on generated images
#   make test   the same, then every check: lint, import layers, types, the whole test suite, wheel-test
#   make wheel-test   the wheel installed WITHOUT extras (the runtime: no PyTorch) in a fresh venv, from a
#                     local wheelhouse (filled from the package index once, kept in build/), then scoring,
#                     evaluate, sort, info and serve checked against the full install
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
EXTRAS ?= all,test,dev
STAMP := $(VENV)/.installed

WHEEL_TEST := build/wheel-test

.PHONY: install demo lint test wheel-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/insightad demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest
	$(MAKE) wheel-test

wheel-test: install
	rm -rf $(WHEEL_TEST)/dist $(WHEEL_TEST)/venv
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEEL_TEST)/dist .
	$(PY) -m pip download --quiet -c constraints.txt -d $(WHEEL_TEST)/wheelhouse $(WHEEL_TEST)/dist/insightad-*.whl
	$(PYTHON) -m venv $(WHEEL_TEST)/venv
	$(WHEEL_TEST)/venv/bin/python -m pip install --quiet --no-index --find-links $(WHEEL_TEST)/wheelhouse \
		$(WHEEL_TEST)/dist/insightad-*.whl
	INSIGHTAD_RUNTIME_PYTHON=$(abspath $(WHEEL_TEST)/venv/bin/python) $(PY) -m pytest -q -rs \
		tests/test_runtime_only.py::test_runtime_only_install

clean-venv:
	rm -rf $(VENV)
