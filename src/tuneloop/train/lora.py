"""PEFT LoRA configuration from `train.lora`, with target modules checked against the real model."""

from __future__ import annotations

from typing import Any

from tuneloop.config import LoraConfig
from tuneloop.errors import ConfigError


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's Linear layers (4-bit ones included), without the output head."""
    import torch

    names: set[str] = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def peft_lora_config(settings: LoraConfig, model: Any) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    target: list[str] | str = settings.target_modules
    if target != "all-linear":
        available = linear_module_names(model)
        unknown = [name for name in target if name not in available]
        if unknown:
            raise ConfigError(
                f"train.lora.target_modules: {', '.join(map(repr, unknown))} not found in the model",
                hint=f"this model's linear layers are: {', '.join(available)} (or use `all-linear`)",
            )
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        bias="none",
    )
