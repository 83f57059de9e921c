"""Preference tuning (`train.method: dpo | orpo`): the model, data and trainer setup that replaces the SFT ones in
`recipe.train_model`, which keeps the rest (run folder, resume, tracking, callbacks, the result).

The policy is a LoRA adapter. With `train.preference.parent` (an SFT run, a registry version or an adapter folder)
the parent's adapter is loaded trainable and trained further, so the result is again one adapter on the base model
that evaluation, the registry and serving load as they load any run. TRL's DPOTrainer, given a PEFT model with a
pretrained adapter and no reference model, copies that adapter into a frozen `ref` adapter and computes the
reference log-probabilities with it: the reference model is the parent. Without a parent, a new adapter
(`train.lora`) goes on the base and the reference is the base (the adapter disabled). ORPO needs no reference.

TRL's config classes extend `TrainingArguments`; the recipe's own mapping of `train.*` onto them is reused
(`recipe.training_arguments`) and TRL's knobs are added under their own names (`beta`, `loss_type`, ...).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.artifacts.training import TrainResult
from tuneloop.config import PREFERENCE_METHODS, LoopConfig, TrainConfig
from tuneloop.device import Precision
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.models import BaseModelRef
from tuneloop.train.inputs import TokenCounter
from tuneloop.workspace import Workspace

REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer gives the frozen copy of a pretrained adapter
_REGISTRY_REFERENCE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[a-z][a-z0-9_-]*)|/(?P<version>\d+))$"
)


def is_preference(settings: TrainConfig) -> bool:
    return settings.method in PREFERENCE_METHODS


@dataclass(frozen=True)
class Parent:
    """The model preference tuning starts from: what the config named and the adapter it resolved to."""

    reference: str  # `train.preference.parent` as written
    adapter: Path
    run_id: str | None  # the training run that produced the adapter, when known
    version: str | None  # `NAME/N` when the reference was a registry version
    base_weights_sha256: str | None

    def summary(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "run_id": self.run_id,
            "version": self.version,
            "adapter": str(self.adapter),
        }


def resolve_parent(config: LoopConfig, workspace: Workspace, base_weights: str) -> Parent | None:
    """`train.preference.parent` -> its adapter: a finished run id, `NAME/N` / `NAME@alias` (through the MLflow
    registry to the version's run), or a PEFT adapter folder. Its base must be this config's base."""
    reference = config.train.preference.parent
    if reference is None:
        return None
    parent = _resolve(config, workspace, reference)
    if parent.base_weights_sha256 is not None and parent.base_weights_sha256 != base_weights:
        raise ConfigError(
            f"train.preference.parent {reference!r} was trained on other base weights than model.base "
            f"({config.model.base})",
            hint="set model.base to the parent's base model (see its summary.json: base_model)",
        )
    return parent


def _resolve(config: LoopConfig, workspace: Workspace, reference: str) -> Parent:
    if "/" not in reference and "@" not in reference and workspace.run(reference).summary.exists():
        return _from_run(workspace, reference, reference, None)
    if "/" not in reference and "@" not in reference and workspace.run(reference).record.exists():
        raise TuneloopError(
            f"train.preference.parent: run {reference!r} has not finished",
            hint="resume it first: tuneloop train -c ITS_CONFIG --resume",
        )
    match = _REGISTRY_REFERENCE.match(reference)
    folder = config.resolve_path(reference)
    if match and not folder.is_dir():
        run_id, version = _registry_run(config, workspace, match)
        return _from_run(workspace, run_id, reference, version)
    if (folder / "adapter_config.json").exists():
        return Parent(reference, folder, None, None, None)
    raise ConfigError(
        f"train.preference.parent {reference!r} is not a finished run id, a registry version (NAME/3, "
        "NAME@champion) or a PEFT adapter folder",
        hint=f"see `tuneloop registry list` and {workspace.runs}",
    )


def _registry_run(config: LoopConfig, workspace: Workspace, match: re.Match[str]) -> tuple[str, str]:
    """The run behind a registry version (its `tuneloop.run_id` tag), read through the tracking store."""
    from tuneloop.tracking import Tracker

    client = Tracker.open(workspace, config.registry.tracking_uri, config.project.name).client
    name = match["name"]
    try:
        found = (
            client.get_model_version_by_alias(name, match["alias"])
            if match["alias"]
            else client.get_model_version(name, match["version"])
        )
    except Exception as exc:  # MLflow raises its own errors for unknown names, versions and aliases
        raise ConfigError(
            f"train.preference.parent {match.string!r}: no such registry version ({type(exc).__name__})",
            hint="see `tuneloop registry list`",
        ) from exc
    run_id = (found.tags or {}).get("tuneloop.run_id")
    if not run_id:
        raise ConfigError(f"train.preference.parent {match.string!r}: the version records no training run")
    return run_id, f"{name}/{found.version}"


def _from_run(workspace: Workspace, run_id: str, reference: str, version: str | None) -> Parent:
    paths = workspace.run(run_id)
    if not paths.summary.exists():
        raise ConfigError(
            f"train.preference.parent {reference!r}: run {run_id} is not in this workspace ({workspace.runs})",
            hint="train from the workspace the parent was trained in, or name its adapter folder",
        )
    result = TrainResult.load(paths.summary)
    if result.adapter_path is None:
        raise ConfigError(
            f"train.preference.parent {reference!r}: run {run_id} fine-tuned all weights ({result.method}); "
            "preference tuning continues a LoRA adapter",
            hint="use a LoRA/QLoRA SFT run as the parent",
        )
    return Parent(reference, Path(result.adapter_path), run_id, version, result.base_weights_sha256)


def setup_model(
    settings: TrainConfig, base: BaseModelRef, precision: Precision, threads: int, parent: Parent | None
) -> tuple[Any, float, Any]:
    """The policy (base, 4-bit when `preference.quantize`, with the parent's adapter trainable), its base weights'
    memory in MiB, and the PEFT config of a new adapter for TRL to add (None when the parent's is trained)."""
    import torch
    from transformers import set_seed

    from tuneloop.train.lora import peft_lora_config
    from tuneloop.train.recipe import load_base_for_training

    torch.set_num_threads(threads)
    set_seed(settings.seed)
    adapter_method = "qlora" if settings.preference.quantize else "lora"
    model = load_base_for_training(base, adapter_method, precision, settings.gradient_checkpointing)
    memory_mb = round(model.get_memory_footprint() / 2**20, 1)
    if parent is None:
        return model, memory_mb, peft_lora_config(settings.lora, model)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(parent.adapter), is_trainable=True)
    return model, memory_mb, None


def load_splits(prepared: PreparedDataset) -> tuple[Any, Any | None]:
    """The prepared pairs as TRL reads them: `prompt`, `chosen`, `rejected` (rendered text)."""
    from datasets import Dataset

    if prepared.manifest.kind != "preference":
        raise ConfigError(
            f"dataset {prepared.dataset_id} holds supervised rows; train.method dpo/orpo needs preference pairs "
            "(rows with chosen and rejected answers)",
            hint="point data.sources at preference data (see docs/data.md, 'Preference data')",
        )
    columns = ["prompt", "chosen", "rejected"]

    def split(name: str) -> Any:
        return Dataset.from_parquet([str(path) for path in prepared.parquet_files(name)], columns=columns)

    train = split("train")
    val = split("val") if prepared.has_validation else None
    return train, val


class CountingCollator:
    """Wraps TRL's collator and counts the real tokens it batches (prompt and both answers), for tokens/s."""

    def __init__(self, inner: Any, counter: TokenCounter) -> None:
        self.inner = inner
        self.counter = counter

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(rows)
        for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask"):
            if key in batch:
                self.counter.tokens += int(batch[key].sum())
        return batch


def setup_trainer(
    config: LoopConfig,
    arguments: Any,
    model: Any,
    peft_config: Any,
    tokenizer: Any,
    train_data: Any,
    val_data: Any,
    callbacks: list[Any],
    counter: TokenCounter,
) -> Any:
    """TRL's DPOTrainer or ORPOTrainer on the prepared pairs, with tuneloop's callbacks and token counting.
    `arguments(config_class, **extra)` builds the run's training arguments as that TRL config class."""
    from transformers.trainer_callback import PrinterCallback

    settings = config.train
    knobs = settings.preference
    if settings.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = arguments(
            DPOConfig,
            beta=knobs.beta,
            loss_type=[knobs.loss_type],
            label_smoothing=knobs.label_smoothing,
            max_length=config.data.max_seq_len,
            truncation_mode="keep_start",
            gradient_checkpointing=False,  # set on the model already when train.gradient_checkpointing asks
            remove_unused_columns=True,  # the text columns stay out of the batches
        )
        trainer_class: Any = _without_reference_in_saves(DPOTrainer)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = arguments(
            ORPOConfig,
            beta=knobs.beta,
            max_length=config.data.max_seq_len,
            gradient_checkpointing=False,
            remove_unused_columns=False,  # ORPO's collator reads its own columns
        )
        trainer_class = ORPOTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, counter)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; the progress bar shows them
    return trainer


def _without_reference_in_saves(trainer_class: type) -> type:
    """The trainer, saving the policy adapter only: the frozen `ref` copy TRL adds is rebuilt from the parent on
    every start (a resumed run too), so checkpoints and the result hold one adapter, loadable as any run's."""

    class PolicyOnlySaves(trainer_class):  # type: ignore[misc, valid-type]
        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            super()._save(output_dir, state_dict)
            shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE_ADAPTER, ignore_errors=True)

    PolicyOnlySaves.__name__ = trainer_class.__name__
    return PolicyOnlySaves


def result_fields(settings: TrainConfig, parent: Parent | None) -> dict[str, Any]:
    """What the run's `TrainResult` records about preference tuning."""
    if not is_preference(settings):
        return {}
    knobs = settings.preference
    return {
        "parent": parent.summary() if parent else None,
        "preference": {
            "beta": knobs.beta,
            "loss_type": knobs.loss_type if settings.method == "dpo" else None,
            "reference_model": ("parent adapter" if parent else "base model") if settings.method == "dpo" else None,
        },
    }


def describe(settings: TrainConfig, parent: Parent | None) -> str:
    """One line for the console: what is trained and against which reference."""
    start = f"continuing {parent.reference}'s adapter" if parent else "a new LoRA adapter on the base"
    if settings.method == "orpo":
        return f"ORPO (beta {settings.preference.beta}): {start}, no reference model"
    reference = f"reference: {parent.reference} (frozen copy)" if parent else "reference: the base model"
    return f"DPO ({settings.preference.loss_type}, beta {settings.preference.beta}): {start}; {reference}"
