"""FSDP2 where Accelerate cannot: sharding with PyTorch's `fully_shard` on CPUs (gloo), inside Transformers' Trainer.

On a GPU-less machine Accelerate selects DDP whatever the FSDP settings (measured: `--use_fsdp` exits 0 and trains
replicated), so for `train.distributed: fsdp` on CPUs tuneloop shards the model itself, after PEFT added the adapter,
so the adapter is sharded too: every decoder layer and then the root become FSDP2 units over a 1-D CPU mesh. The
Trainer is told, through the flag Transformers uses for models sharded at load time, not to wrap the model in DDP.

Checkpoints: each `checkpoint-N/` holds the full adapter (PEFT layout, gathered from every rank) for humans and
`load_best_model_at_end`, and `sharded/`, a torch.distributed.checkpoint (DCP) of the sharded model and optimizer
state written by every rank, which `--resume` loads back into the shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

from tuneloop.config import DistributedConfig

SHARDED = "sharded"  # DCP folder inside a checkpoint (Trainer's own layout: checkpoint-N/)


def _options(loading: bool) -> Any:
    """Frozen weights (a LoRA run's base) stay out of the checkpoints: they come from the base model itself."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def shard_model(model: Any, settings: DistributedConfig, compute_dtype: Any) -> Any:
    """Apply FSDP2 to each decoder layer, then the root. Parameters of different dtypes (a 16-bit frozen base with
    fp32 LoRA weights) are cast to `compute_dtype` for compute and their gradients reduced in fp32."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    options: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": settings.reshard_after_forward,
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if settings.cpu_offload else OffloadPolicy(),
    }
    if compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks, by the class names Transformers marks as not to be split (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules): cannot shard it")
    return layers


def full_state_dict(model: Any) -> dict[str, Any]:
    """The unsharded state dict, gathered by every rank (a collective) and kept on rank 0 only (others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_tensor(parameter: Any) -> Any:
    """What this rank holds of a parameter: its shard under FSDP2 (a DTensor's local part), its partition under
    DeepSpeed ZeRO-3 (`ds_tensor`), else the whole tensor."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


def local_sizes(model: Any) -> tuple[int, int]:
    """(trainable, frozen) elements this rank holds."""
    trainable = frozen = 0
    for parameter in model.parameters():
        count = local_tensor(parameter).numel()
        if parameter.requires_grad:
            trainable += count
        else:
            frozen += count
    return trainable, frozen


class ShardedTrainer(Trainer):
    """Trainer over a model sharded by `shard_model`: no DDP wrap, full adapter + DCP shards in checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Transformers' path for a model that already owns placement and gradient reduction (sharded at load).
        self.is_distributed_loading_by_transformers = True
        self.place_model_on_device = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state = full_state_dict(self.model)  # every rank takes part
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_options(loading=False))
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(output_dir) / SHARDED)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Nothing here: the shards are restored together with the optimizer (`_load_optimizer_and_scheduler`)."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_options(loading=False))
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=Path(checkpoint) / SHARDED)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=_options(loading=True),
        )
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def _load_best_model(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        best = self.state.best_model_checkpoint
        if best is None:
            return
        state = {"model": get_model_state_dict(self.model, options=_options(loading=False))}
        dcp.load(state, checkpoint_id=Path(best) / SHARDED)
        set_model_state_dict(self.model, state["model"], options=_options(loading=True))
