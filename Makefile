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

test: install
	$(PY) -m pytest tests

# Skips the end-to-end and training runs marked slow (CI runs everything).
test-fast: install
	$(PY) -m pytest tests -m "not slow"

# Lint and import order (configuration in pyproject.toml); CI runs it before the tests.
lint: install
	$(PY) -m ruff check .
