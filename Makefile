# Quick start:  make demo  (sets everything up, runs the main job on a small default)
#               make test  (sets everything up, runs the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install demo test test-fast

install:
	./tools/install.sh

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest tests

# Skips the end-to-end runs marked slow.
test-fast: install
	$(PY) -m pytest tests -m "not slow"
