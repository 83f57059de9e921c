"""`train.distributed`: which strategy runs how, checked before anything is launched.

| strategy | GPU | CPU |
|---|---|---|
| ddp | Trainer + Accelerate DDP (NCCL) | Trainer + Accelerate DDP (gloo) |
| fsdp | Trainer + Accelerate FSDP2 (`fsdp_version: 2`) | Trainer + tuneloop's FSDP2 (`fully_shard` over gloo, train/fsdp.py): Accelerate runs DDP instead on CPUs (measured); QLoRA too (4-bit weights stored as the compute dtype) |
| deepspeed_zero2/3 | Trainer's DeepSpeed integration, config generated here | the same, over gloo (DeepSpeed's CPU accelerator; it compiles a small shared-memory op with the C++ compiler on first use) |
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tuneloop.config import DistributedConfig, TrainConfig
from tuneloop.errors import ConfigError


def check_strategy(settings: TrainConfig, world_size: int, gpu: bool) -> list[str]:
    """Raise for combinations that cannot work; return notes on what will happen instead of what one might expect."""
    distributed = settings.distributed
    strategy = distributed.strategy
    notes: list[str] = []
    where = "train.distributed"
    if distributed.cpu_offload and strategy == "ddp":
        raise ConfigError(
            f"{where}.cpu_offload applies to fsdp and deepspeed, not ddp",
            hint="set train.distributed.strategy: fsdp (or deepspeed_zero3 on GPUs), or cpu_offload: false",
        )
    if distributed.backend == "nccl" and not gpu:
        raise ConfigError(f"{where}.backend=nccl needs GPUs; this machine has none", hint="use backend: auto (gloo)")
    if strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"{where}.strategy={strategy} needs the deepspeed package, which is not installed",
                hint="`make deepspeed` installs it (on CPU machines: DS_BUILD_OPS=0 pip install --no-build-isolation "
                "deepspeed); or use strategy: fsdp",
            )
        if not gpu:
            notes.append(
                f"{strategy} on CPUs runs DeepSpeed's CPU accelerator over gloo; its communication op is compiled "
                "with the C++ compiler on first use (and cpu_adam for cpu_offload), once per machine"
            )
        if settings.method == "qlora" and strategy == "deepspeed_zero3":
            notes.append(
                "QLoRA with ZeRO-3: the 4-bit weights are stored as the compute dtype "
                "(bnb_4bit_quant_storage) so DeepSpeed can partition them"
            )
    if strategy == "fsdp" and settings.method == "qlora":
        notes.append("QLoRA with FSDP: the 4-bit weights are stored as the compute dtype (bnb_4bit_quant_storage)")
    if strategy != "ddp" and world_size == 1:
        notes.append(f"{strategy} over one process shards nothing: it runs as plain training")
    return notes


def shards_4bit_weights(settings: TrainConfig) -> bool:
    """Whether 4-bit weights must be stored as the compute dtype (FSDP and ZeRO-3 shard them as ordinary tensors)."""
    return settings.method == "qlora" and settings.distributed.strategy in ("fsdp", "deepspeed_zero3")


def uses_tuneloop_fsdp(settings: TrainConfig, world_size: int, gpu: bool) -> bool:
    """FSDP2 applied by tuneloop (CPU), rather than by Accelerate (GPU)."""
    return settings.distributed.strategy == "fsdp" and world_size > 1 and not gpu


def trainer_arguments(settings: TrainConfig, world_size: int, gpu: bool, precision: str) -> dict[str, Any]:
    """Extra `TrainingArguments` for the strategy (Transformers' own names)."""
    distributed = settings.distributed
    arguments: dict[str, Any] = {"ddp_timeout": distributed.timeout_minutes * 60}
    if distributed.backend != "auto":
        arguments["ddp_backend"] = distributed.backend
    if world_size == 1:
        return arguments
    if distributed.strategy == "fsdp" and gpu:
        arguments["fsdp"] = "full_shard auto_wrap" + (" offload" if distributed.cpu_offload else "")
        arguments["fsdp_config"] = {
            "fsdp_version": 2,
            "reshard_after_forward": distributed.reshard_after_forward,
            "state_dict_type": "SHARDED_STATE_DICT",
        }
    if distributed.strategy.startswith("deepspeed"):
        arguments["deepspeed"] = deepspeed_config(distributed, precision)
    return arguments


def deepspeed_config(distributed: DistributedConfig, precision: str) -> dict[str, Any]:
    """A DeepSpeed config for Transformers' integration: `auto` values are filled from the TrainingArguments."""
    stage = 3 if distributed.strategy == "deepspeed_zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if distributed.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # The adapter (or model) is saved as one 16-bit state dict, gathered from the partitions by every rank.
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        )
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
