# Quick start:  make demo  (sets everything up, runs the main job on a small default)
#               make test  (sets everything up, runs the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install demo test test-fast test-gpu lint

install:
	./tools/install.sh

demo: install
	$(PY) tools/demo.py

# Two workers (pytest-xdist) of one thread each (two of two would contend for the cores), that
# take each other's pending tests when idle (worksteal).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist worksteal

# Skips the tests marked slow: training runs, tool runs in a subprocess (CI runs everything).
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -m "not slow" -n 2 --dist worksteal

# The CUDA paths (tests marked cuda; they skip without a GPU), then a report of each check's
# figure and the GPU benchmark (docs/gpu.md).
test-gpu: install
	$(PY) -m pytest tests -m cuda -rs
	$(PY) tools/analysis/benchmark.py --device cuda --arch s12 --variants reference fast deploy \
	    plain:fp16 deploy:fp16 plain:bf16 deploy:bf16 --shape 512 --batch 8
	$(PY) tools/analysis/benchmark.py --device cuda --model configs/segmentation/fpn_poolformer_s12.py \
	    --variants reference deploy deploy:fp16 deploy:bf16 --shape 512 --batch 8
	$(PY) tools/analysis/benchmark.py --device cuda --model configs/detection/retinanet_poolformer_s12.py \
	    --variants reference deploy deploy:fp16 deploy:bf16 --shape 800 1216 --batch 2

# Lint and import order (configuration in pyproject.toml); CI runs it before the tests.
lint: install
	$(PY) -m ruff check .
