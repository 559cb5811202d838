# Quick start:  make demo  (sets everything up, runs the main job on a small default)
#               make test  (sets everything up, runs the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install demo test test-fast lint

install:
	./tools/install.sh

demo: install
	$(PY) tools/demo.py

# Two workers (pytest-xdist); the tests of a file share a worker and its module fixtures.
test: install
	$(PY) -m pytest tests -n 2 --dist loadfile

# Skips the tests marked slow: training runs, tool runs in a subprocess (CI runs everything).
test-fast: install
	$(PY) -m pytest tests -m "not slow" -n 2 --dist loadfile

# Lint and import order (configuration in pyproject.toml); CI runs it before the tests.
lint: install
	$(PY) -m ruff check .
