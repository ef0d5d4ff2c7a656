# Thin targets. Without an active virtual environment, one is created in .venv inside the repo, so
# nothing leaks into the system Python. TORCH_SPEC is what gets installed when torch is missing
# (the default wheel from PyPI carries CUDA; any torch >= 2.1 works).
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv

ifdef VIRTUAL_ENV
PY := python
STAMP := $(VIRTUAL_ENV)/.smmcl-deps
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smmcl-deps
endif

# One BLAS/OpenMP thread per process in tests: several test processes share the cores, and
# oversubscribed OpenMP threads spin-wait (a forward pass went from 0.06 s to 8 s on 2 busy cores).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# pytest-xdist workers, one per core by default (the suite is mostly single-threaded Triton-interpreter
# and CPU work): TEST_WORKERS=0 runs it in one process. The tests that start processes (integration:
# torchrun, spawn, gloo, SIGKILL) run after them, one at a time, with the cores to themselves: under a
# second worker's load a restarted gloo rank was seen to abort at exit. The workers take the tests two
# at a time, the slow ones first (tests/conftest.py), so that no core is left idle while the other runs
# a long test drawn last.
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --maxschedchunk 2

.PHONY: install test test-quick demo ablation bench clean

install: $(STAMP)

# requirements.txt ends with `-e .`: the same pip call installs the package editable (pyproject.toml),
# so `import smmcl` works from any directory. torch comes first, so pip never resolves another one.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x $(VENV)/bin/python ]; then python3 -m venv $(VENV); fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

test: install
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m "not integration"
	$(TEST_ENV) $(PY) -m pytest -q -m integration

# Skips the slow tests and those that start processes (subprocess, spawn, gloo): about 3 minutes on 2 cores.
test-quick: install
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m "not slow and not integration"

demo: install
	$(PY) -m smmcl.demo

# The demo's model trained again without the contrastive terms (weights 0), numbers side by side; reuses
# a finished `make demo` run, so it adds one training (both runs do not fit the demo's 10 minutes).
ablation: install
	$(PY) -m smmcl.demo --ablation

bench: install
	$(PY) bench/bench.py

clean:
	rm -rf demo_out .pytest_cache .hypothesis smmcl.egg-info
