# Short aliases. Every target creates .venv (Python >= 3.12) on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` spreads the tests over up to 4 processes (one per core) on
# machines without an NVIDIA GPU; with one, a single process, since each
# would claim most of the GPU's memory.
TEST_WORKERS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo auto --maxprocesses=4)

.PHONY: venv test test-gpu demo lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@python_bin="$${PYTHON:-$$(scripts/find_python.sh)}" || exit 1; \
	echo "Creating $(VENV) with $$python_bin"; \
	"$$python_bin" -m venv $(VENV) && \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# CPU tier (and, on a GPU machine, the GPU tier too: gpu tests skip without one).
# pytest exits 5 when a selection collects no test; that is reported, not an error.
test: $(STAMP)
	@$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; \
	exit $$rc

test-gpu: $(STAMP)
	@$(PY) -m pytest -q -m gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no gpu tests were collected"; exit 0; fi; \
	exit $$rc

demo: $(STAMP)
	$(PY) -m fp4jax.demo

lint: $(STAMP)
	$(PY) -m ruff check fp4jax pallas_kernels tests benchmarks scripts
	$(PY) -m ruff format --check fp4jax pallas_kernels tests benchmarks scripts

format: $(STAMP)
	$(PY) -m ruff check --fix fp4jax pallas_kernels tests benchmarks scripts
	$(PY) -m ruff format fp4jax pallas_kernels tests benchmarks scripts

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
