"""One precision resolver for every engine (serve/engines/precision.py): vLLM's `--dtype`, llama.cpp's GGUF type,
the in-process dtype and `engine: auto`'s ranking all follow `tuneloop.device.resolve_precision`, so an AVX2-only CPU
(bf16 only emulated) gets float32 everywhere and an AMX CPU bf16.

`ONEDNN_MAX_CPU_ISA=AVX2` makes this machine's resolver answer as an AVX2-only CPU's does (device.cpu_has_fast_bf16
honours oneDNN's cap), which is how the AVX2 cases run on any CPU."""

from __future__ import annotations

import pytest

from tuneloop.config import ServeConfig
from tuneloop.device import cpu_has_fast_bf16, has_gpu
from tuneloop.serve.engines.precision import engine_ranking, gguf_type, serving_precision, vllm_dtype
from tuneloop.serve.engines.vllm import vllm_arguments

pytestmark = pytest.mark.skipif(has_gpu(), reason="the CPU cases; a GPU resolves to bf16/fp16")


def dtype_flag(settings: ServeConfig, **kwargs: bool) -> str:
    arguments = vllm_arguments(settings, "base", "/models/base", {}, 8, 512, None, **kwargs)
    return arguments[arguments.index("--dtype") + 1]


def test_avx2_cpu_serves_float32_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    settings = ServeConfig()
    assert serving_precision(settings).name == "fp32"
    assert dtype_flag(settings) == "float32"  # vLLM's own `auto` would run bf16, emulated: 4.7x slower
    assert gguf_type(settings) == "q8_0"  # int8 kernels need no bf16
    assert gguf_type(ServeConfig(precision="fp32")) == "f32"
    ranking = engine_ranking(settings)
    assert [name for name, _ in ranking] == ["llamacpp", "vllm", "transformers"]
    assert "float32" in ranking[1][1] and "without fast bf16" in ranking[1][1]


def test_fast_bf16_cpu_serves_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no AMX/AVX512-BF16")
    assert dtype_flag(ServeConfig()) == "bfloat16"
    assert gguf_type(ServeConfig(precision="bf16")) == "bf16"


def test_explicit_precision_and_deploy_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert dtype_flag(ServeConfig(precision="bf16")) == "bfloat16"  # asked for: obeyed
    assert vllm_dtype(ServeConfig(precision="fp16")) == "float16"
    # A deploy artifact runs on another machine (a GPU image): this CPU's features must not decide its dtype.
    assert dtype_flag(ServeConfig(), for_this_machine=False) == "auto"
    assert dtype_flag(ServeConfig(precision="fp32"), for_this_machine=False) == "float32"
    assert gguf_type(ServeConfig(llamacpp_quant="q4_k_m", precision="fp32")) == "q4_k_m"  # a named quant wins
