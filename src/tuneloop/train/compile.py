"""`train.compile`: regional `torch.compile` of the decoder layers (Inductor).

Compiling each repeated decoder layer instead of the whole model compiles one graph that every layer reuses
(PyTorch's "regional compilation" recipe): ~10 s on 2 CPU cores instead of ~2.5 min for the whole model, cached
across runs by Inductor's FX-graph cache, and the LM head and loss stay eager (they gather supervised positions,
whose count changes every batch). Measured speed-ups are in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

from tuneloop.config import TrainConfig


def compile_decision(settings: TrainConfig, gpu: bool, world_size: int) -> tuple[bool, str]:
    """Whether to compile, and why (printed at the start of a run)."""
    if settings.compile == "auto":
        if gpu:
            return False, "auto: not measured on GPUs yet"
        if settings.method == "qlora":
            return False, "auto: bitsandbytes' 4-bit layers break the graph"
        if settings.gradient_checkpointing:
            return False, "auto: gradient checkpointing recomputes outside the compiled graph"
        if settings.method == "lora" and settings.lora.dropout > 0:
            return False, "auto: LoRA dropout > 0 made the compiled layers slower than eager (measured)"
        if settings.distributed.strategy != "ddp" and world_size > 1:
            return False, f"auto: not with {settings.distributed.strategy}"
        return True, "auto: regional compile of the decoder layers on CPU"
    return bool(settings.compile), "set in the config"


def compile_decoder_layers(model: Any) -> int:
    """Compile every module whose class is one of the model's repeated blocks (`_no_split_modules`, e.g.
    LlamaDecoderLayer) in place; returns how many."""
    block_names = set(_repeated_blocks(model))
    compiled = 0
    for module in model.modules():
        if type(module).__name__ in block_names:
            module.compile()
            compiled += 1
    return compiled


def _repeated_blocks(model: Any) -> list[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside PEFT's wrapper
    return list(getattr(inner, "_no_split_modules", None) or [])
