"""What each engine is told to compute in, from `serve.precision` as `tuneloop.device.resolve_precision` resolves it:
one resolver for vLLM's `--dtype`, llama.cpp's GGUF type, the in-process engine's torch dtype and `engine: auto`.

Why it matters (measured, docs/benchmarks.md): on an AVX2-only CPU vLLM's own `--dtype auto` runs bf16, which such
CPUs only emulate: 19.3 tokens/s at 32 users vs 90.4 with float32."""

from __future__ import annotations

from tuneloop.config import ServeConfig
from tuneloop.device import Precision, resolve_precision

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GGUF_TYPES = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}
# llama.cpp's default weights when nothing asks for a float type: int8 dot products are fast on AVX2 and AVX-512 alike.
DEFAULT_GGUF = "q8_0"


def serving_precision(settings: ServeConfig) -> Precision:
    """The precision every engine of this machine serves in (bf16 on GPUs and AMX/AVX512-BF16 CPUs, fp32 on others)."""
    return resolve_precision(settings.precision)


def vllm_dtype(settings: ServeConfig, *, for_this_machine: bool = True) -> str:
    """vLLM's `--dtype`. `for_this_machine` False (a deploy artifact for another machine, a GPU image): `auto` stays
    vLLM's own `auto`, since this CPU's features say nothing about the target's."""
    if not for_this_machine and settings.precision == "auto":
        return "auto"
    return VLLM_DTYPES[serving_precision(settings).name]


def gguf_type(settings: ServeConfig) -> str:
    """The GGUF type llama.cpp serves: `serve.llamacpp_quant`, or under `auto` q8_0 unless `serve.precision` names a
    float dtype (then that one, e.g. fp32 -> f32 for parity with the in-process engine)."""
    if settings.llamacpp_quant != "auto":
        return settings.llamacpp_quant
    if settings.precision == "auto":
        return DEFAULT_GGUF
    return GGUF_TYPES[serving_precision(settings).name]


def engine_ranking(settings: ServeConfig) -> list[tuple[str, str]]:
    """The engines `serve.engine: auto` tries, fastest first on this machine, each with why (logged when chosen).

    GPU: vLLM (CUDA kernels, paged attention), then llama.cpp. CPU: llama.cpp first on every CPU measured here —
    its q8_0 kernels need no bf16 support (AVX2 int8 dot products), and it gave 2.6x vLLM's tokens/s to one user and
    ~84% of vLLM's at 32 users on an AMX CPU; then vLLM in the resolved dtype (bf16 only where the CPU has it)."""
    precision = serving_precision(settings)
    if precision.name != "fp32" and "CUDA" in precision.reason:
        return [
            ("vllm", f"GPU ({precision.name}): vLLM's CUDA kernels and continuous batching"),
            ("llamacpp", "GPU: llama.cpp (GGUF)"),
            ("transformers", f"in-process Transformers ({precision.name})"),
        ]
    return [
        ("llamacpp", f"CPU ({precision.reason}): llama.cpp {gguf_type(settings)} int8/float kernels, no bf16 needed"),
        ("vllm", f"CPU ({precision.reason}): vLLM-CPU with --dtype {VLLM_DTYPES[precision.name]}"),
        ("transformers", f"in-process Transformers ({precision.name})"),
    ]
