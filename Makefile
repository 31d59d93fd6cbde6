# Two commands do all the set-up on a fresh machine (see README):
#   make demo   create .venv if there is none, install, run the demo on generated images
#   make test   the same, then every check: lint, import layers, types, the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
EXTRAS ?= all,test,dev
STAMP := $(VENV)/.installed

.PHONY: install demo lint test clean-venv

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

clean-venv:
	rm -rf $(VENV)
