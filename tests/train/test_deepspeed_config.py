"""The DeepSpeed configs tuneloop generates (`train.distributed: deepspeed_zero2 | deepspeed_zero3`), checked by
DeepSpeed itself, and the up-front checks (DeepSpeed on CPUs gets a note; a missing package stops the run).

Each config goes the way the Trainer takes it: Transformers' `HfTrainerDeepSpeedConfig` fills the "auto" values
from real `TrainingArguments` and the model's hidden size (and fails on a value that contradicts them), then
DeepSpeed's own `DeepSpeedConfig` parses the result (its ZeRO section is a pydantic model that forbids unknown keys;
batch sizes must agree). None of this needs a GPU or a process group. `make deepspeed` (part of `make test`) installs deepspeed (it installs on
CPU-only machines without touching torch); the tests skip when it is missing. Training with it on CPUs is tested in
tests/train/test_distributed.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config import DistributedConfig, TrainConfig
from tuneloop.errors import ConfigError
from tuneloop.train.strategies import check_strategy, deepspeed_config

MICRO_BATCH = 2
GRAD_ACCUM = 4
MAX_GRAD_NORM = 0.7
TRAINING_STEPS = 12


@pytest.fixture(scope="module")
def deepspeed() -> Any:
    return pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")


@pytest.fixture
def hf_deepspeed_config(deepspeed: Any) -> Iterator[type]:
    """Transformers' Trainer-side config class. Creating one registers it globally (from_pretrained would then
    load models under ZeRO-3's zero.Init), so the registration is undone after the test."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    try:
        yield HfTrainerDeepSpeedConfig
    finally:
        unset_hf_deepspeed_config()


@pytest.fixture(scope="module")
def tiny_model(deepspeed: Any, tiny_model_dir: Path) -> Any:  # skips before building the model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def training_arguments(folder: Path, precision: str) -> Any:
    """The arguments tuneloop's recipe passes that DeepSpeed's "auto" values come from (same precision rule)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=True,
        report_to="none",
    )


def auto_values(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in auto_values(value, f"{path}.{key}".lstrip("."))]
    return [path] if node == "auto" else []


def known_top_level_keys(deepspeed: Any) -> set[str]:
    """Every key DeepSpeed's config reader knows at the top level. It ignores any other silently, so a misspelt
    section would pass DeepSpeedConfig: check against its own constants instead."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    names = {value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)}
    return names | {ZERO_OPTIMIZATION}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cpu_offload", [False, True], ids=["resident", "cpu_offload"])
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_generated_config_resolves_and_deepspeed_accepts_it(
    strategy: str,
    cpu_offload: bool,
    precision: str,
    deepspeed: Any,
    hf_deepspeed_config: type,
    tiny_model: Any,
    tmp_path: Path,
) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    generated = deepspeed_config(DistributedConfig(strategy=strategy, cpu_offload=cpu_offload), precision)
    assert set(generated) <= known_top_level_keys(deepspeed)
    stage = 3 if strategy == "deepspeed_zero3" else 2

    # The Trainer's two passes: from the arguments (at TrainingArguments creation), then from the model and the
    # step count (at train()). The second raises if a fixed value contradicts the arguments.
    arguments = training_arguments(tmp_path, precision)
    resolved = hf_deepspeed_config(copy.deepcopy(generated))
    resolved.trainer_config_process(arguments)
    resolved.trainer_config_finalize(arguments, tiny_model, TRAINING_STEPS)
    config = resolved.config
    assert auto_values(config) == []

    DeepSpeedZeroConfig(**config["zero_optimization"])  # forbids unknown keys: a misspelt option fails here
    parsed = DeepSpeedConfig(copy.deepcopy(config))  # one process: world size 1
    assert parsed.train_micro_batch_size_per_gpu == MICRO_BATCH
    assert parsed.gradient_accumulation_steps == GRAD_ACCUM
    assert parsed.train_batch_size == MICRO_BATCH * GRAD_ACCUM * arguments.world_size
    assert parsed.gradient_clipping == MAX_GRAD_NORM
    assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == (precision == "bf16", precision == "fp16")
    zero = parsed.zero_config
    assert parsed.zero_enabled and zero.stage == stage
    assert zero.overlap_comm and zero.contiguous_gradients
    hidden = tiny_model.config.hidden_size
    assert zero.reduce_bucket_size == hidden * hidden  # "auto", from the model
    optimizer_device = zero.offload_optimizer.device if zero.offload_optimizer else OffloadDeviceEnum.none
    assert optimizer_device == (OffloadDeviceEnum.cpu if cpu_offload else OffloadDeviceEnum.none)
    param_device = zero.offload_param.device if zero.offload_param else OffloadDeviceEnum.none
    # Parameters can only be offloaded when they are partitioned (ZeRO-3).
    assert param_device == (OffloadDeviceEnum.cpu if cpu_offload and stage == 3 else OffloadDeviceEnum.none)
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save  # the adapter is saved whole, not as partitions
        assert zero.prefetch_bucket_size == int(0.9 * hidden * hidden)
        assert zero.param_persistence_threshold == 10 * hidden


def test_a_misspelt_zero_option_is_caught(deepspeed: Any) -> None:
    """The check above has teeth: DeepSpeed's ZeRO model rejects what it does not know."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(pydantic.ValidationError, match="stage3_gather_16bit_weights_on_model_sav"):
        DeepSpeedZeroConfig(stage=3, stage3_gather_16bit_weights_on_model_sav=True)


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_cpus_is_allowed_with_a_note(strategy: str) -> None:
    pytest.importorskip("deepspeed")
    notes = check_strategy(TrainConfig(distributed=strategy), world_size=2, gpu=False)
    assert any("CPU accelerator over gloo" in note for note in notes)


def test_deepspeed_missing_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the package (simulated: find_spec answers None for it), the run stops before launching."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="needs the deepspeed package") as refused:
        check_strategy(TrainConfig(distributed="deepspeed_zero3"), world_size=2, gpu=False)
    assert "fsdp" in (refused.value.hint or "")
