"""The training speed levers keep the numbers right: the supervised-only head gives the model's own loss and
gradients, the schedule, packing length, threads and throughput accounting do what docs/training.md says."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tuneloop.config import TrainConfig


def _lora_model(tiny_model_dir: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _batches() -> list[dict[str, Any]]:
    """A padded batch (attention mask, -100 on prompt and padding) and a packed one (restarting position ids)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (2, 24), generator=generator)
    labels = ids.clone()
    labels[:, :15] = -100  # the prompt
    labels[1, 20:] = -100  # padding of the shorter row
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed_labels = ids.clone()
    packed_labels[:, [0, 1, 2, 3, 12, 13, 14]] = -100
    positions = torch.cat([torch.arange(12), torch.arange(12)]).repeat(2, 1)
    packed = {"input_ids": ids, "position_ids": positions, "labels": packed_labels}
    return [padded, packed]


@pytest.mark.parametrize("chunk", [1024, 5])
def test_supervised_head_gives_the_models_own_loss_and_gradients(
    tiny_model_dir: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneloop.train import head

    monkeypatch.setattr(head, "CHUNK_TOKENS", chunk)  # 5: several checkpointed chunks
    model = _lora_model(tiny_model_dir)
    assert head.supports_supervised_head(model) is None
    for batch in _batches():
        reference = model(**batch).loss
        reference.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        loss = head.supervised_loss(model, batch)
        loss.backward()
        assert abs(loss.item() - reference.item()) < 1e-5
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert (parameter.grad - expected[name]).abs().max().item() < 1e-5, name
        model.zero_grad()


def test_supervised_head_is_refused_for_models_that_scale_their_logits(tiny_model_dir: Path) -> None:
    from tuneloop.train.head import supports_supervised_head

    model = _lora_model(tiny_model_dir)
    model.config.logit_scale = 0.5
    assert "scales its logits" in (supports_supervised_head(model) or "")


@pytest.mark.parametrize(
    ("samples", "epochs", "steps"),
    [(125, 3, 96), (500, 2, 250), (5000, 1, 1250)],  # ~500 / 2,000 / 20,000 short rows packed 4 to a sample
)
def test_auto_epochs_reach_the_step_target_within_the_epoch_cap(samples: int, epochs: int, steps: int) -> None:
    from tuneloop.train.schedule import plan_schedule

    schedule = plan_schedule(TrainConfig(), samples)
    assert (schedule.epochs, schedule.total_steps) == (epochs, steps)
    assert schedule.eval_every == schedule.save_every == max(10, -(-steps // 5))


def test_explicit_epochs_max_steps_and_intervals_win() -> None:
    from tuneloop.train.schedule import plan_schedule

    assert plan_schedule(TrainConfig(epochs=1), 500).total_steps == 125
    fixed = plan_schedule(TrainConfig(max_steps=7, eval_every=3, save_every=6), 500)
    assert (fixed.total_steps, fixed.eval_every, fixed.save_every, fixed.limited_by_max_steps) == (7, 3, 6, True)
    assert plan_schedule(TrainConfig(save_every=20), 500).eval_every == 20  # keep-best: validate at checkpoints
    assert plan_schedule(TrainConfig(batch_size=2, grad_accum=2), 500, world_size=2).steps_per_epoch == 63


def test_packing_length_follows_the_rows() -> None:
    from tuneloop.data.pack import packing_length

    assert packing_length("auto", 60, 1024) == 256
    assert packing_length("auto", 300, 1024) == 512
    assert packing_length("auto", 900, 640) == 900  # max_seq_len below the longest row: the row still fits
    assert packing_length(128, 100, 1024) == 128


def test_threads_follow_the_cpus_this_process_may_use() -> None:
    import os

    from tuneloop.device import available_cpus, training_threads

    usable = available_cpus()
    assert 1 <= usable <= len(os.sched_getaffinity(0))
    assert training_threads(None, 1) == usable
    assert training_threads(None, usable + 1) == 1
    assert training_threads(3, 1) == 3


def test_tokens_per_second_leaves_out_the_first_step_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.train import callbacks
    from tuneloop.train.callbacks import ThroughputCallback
    from tuneloop.train.inputs import TokenCounter

    clock = {"now": 100.0}  # a fake clock: the accounting is checked, not this machine's timer
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock["now"])
    counter = TokenCounter()
    throughput = ThroughputCallback(counter)
    state = SimpleNamespace()
    throughput.on_train_begin(None, state, None)
    for step in range(3):
        throughput.on_step_begin(None, state, None)
        clock["now"] += 2.0 if step == 0 else 0.5  # the first step compiles
        counter.tokens += 100
        throughput.on_step_end(None, state, None)
        if step == 1:
            clock["now"] += 3.0  # a validation pass
            counter.tokens += 1000  # its batches
            throughput.on_evaluate(None, state, None)
    throughput.on_train_end(None, state, None)
    assert throughput.train_tokens() == 300
    assert throughput.first_step_seconds == 2.0
    assert throughput.tokens_per_second() == 200  # 200 tokens in 1 s of steps after the first


def test_validation_shows_its_own_progress_bar() -> None:
    from rich.console import Console

    from tuneloop.train.callbacks import RichProgressCallback, ThroughputCallback
    from tuneloop.train.inputs import TokenCounter

    progress = RichProgressCallback(Console(quiet=True), ThroughputCallback(TokenCounter()))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    progress.on_train_begin(None, state, None)
    progress.on_prediction_step(None, state, None, eval_dataloader=[1, 2, 3])
    progress.on_prediction_step(None, state, None, eval_dataloader=[1, 2, 3])
    assert progress.progress is not None
    validation = [task for task in progress.progress.tasks if task.description == "validate"]
    assert len(validation) == 1 and (validation[0].completed, validation[0].total) == (2, 3)
    progress.on_evaluate(None, state, None)
    assert [task.description for task in progress.progress.tasks] == ["train"]
    progress.on_train_end(None, state, None)


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("train", {"eval_every": 0}),
        ("train", {"save_every": -2}),
        ("train", {"epochs": 0}),
        ("data", {"packing_length": 4}),
    ],
)
def test_auto_or_a_positive_number_is_required(section: str, values: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from tuneloop.config import DataConfig

    with pytest.raises(ValidationError, match="or `auto`"):
        (TrainConfig if section == "train" else DataConfig)(**values)
