# Two commands set everything up on a fresh machine:
#   make run   - venv + compiled extension + the gateway on its embedded default
#   make test  - venv + compiled extension + import walls, lint, types + the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# One build at a time: the extension is one compilation unit written in place.
LOCK   := flock /tmp/gridgate-build.lock

.PHONY: run test lint build venv bench bench-micro clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "Cython>=3.0" "setuptools>=68" wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(LOCK) $(PY) setup.py -q build_ext --inplace

run: build
	ENVIRONMENT=$${ENVIRONMENT:-development} SERVICE_NAME=$${SERVICE_NAME:-gridgate} \
	  $(VENV)/bin/gridgate serve $(ARGS)

# The walls between stages (import-linter contracts in pyproject.toml), the
# linter and the type checker run before the tests: a broken wall fails CI.
lint: build
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench-micro: build
	$(PY) -m bench.micro

# System benchmarks (DESIGN section 9): make bench ARGS="pipelines --duration 10"
bench: build
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(or $(ARGS),all)

clean:
	rm -rf build src/_fastparse.c src/gridgate/_fastparse*.so
