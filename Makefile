# `make demo` and `make test` create the virtual environment on first use.
# CPU torch: torch==2.13.0 is pinned; elsewhere you may point pip at PyTorch's CPU wheels with
#   make test PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=

.PHONY: demo test test-fast test-cuda-on-cpu lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/iaat demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), one torch thread each; TEST_WORKERS=0 runs it in one.
# It lists its 15 slowest tests at the end: the suite is meant to stay under 10 minutes on 2 cores.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

# Leaves out the end-to-end tests (trainings, sweeps, distributed runs, the examples): marked `slow`.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# The GPU-only tests (tests/test_cuda.py) run on the CPU: a dry run of their own code between GPU loans.
test-cuda-on-cpu: $(VENV)/.installed
	IAAT_CUDA_TESTS_DEVICE=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m cuda tests/test_cuda.py

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks examples

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py

clean-venv:
	rm -rf $(VENV)
