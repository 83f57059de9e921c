"""`train.eval_generate` (task metrics from generations during training) and `train.metric_for_best`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.config_file import load_config
from tuneloop.errors import ConfigError
from tuneloop.train.recipe import train_model
from tuneloop.workspace import Workspace

runner = CliRunner()


def train_cli(config: Path, *args: str) -> dict:
    result = runner.invoke(app, ["train", "-c", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def logged(history: list[dict[str, Any]], name: str) -> dict[int, float]:
    return {entry["step"]: entry[name] for entry in history if name in entry}


def test_task_metrics_are_logged_at_their_steps_and_match_the_saved_model(train_config, workspace: Path) -> None:
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.train.eval_generate import generate_answers, load_generation_rows, score_answers

    config_path = train_config(
        eval_generate={"every": 8, "rows": 6, "metrics": ["exact_match", "rouge"]}, keep_best=False
    )
    result = runner.invoke(app, ["train", "-c", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert "eval_rouge_l" in result.stderr and "generation" in result.stderr  # the progress display's eval line
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    # validation every 4 steps; task metrics at multiples of 8 and at the last step
    assert sorted(logged(history, "eval_loss")) == [4, 8, 12]
    for name in ("eval_exact_match", "eval_rouge_1", "eval_rouge_2", "eval_rouge_l", "eval_generate_seconds"):
        assert sorted(logged(history, name)) == [8, 12], name
    assert all(0 <= value <= 1 for value in logged(history, "eval_rouge_l").values())
    assert logged(history, "eval_rouge_l")[12] > 0  # the tiny model learns the answers' words in 12 steps

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    tracked = client.get_metric_history(summary["mlflow_run_id"], "eval_rouge_l")
    assert {point.step: point.value for point in tracked} == pytest.approx(logged(history, "eval_rouge_l"))

    # The value logged at the last step is the saved model's score on the same rows.
    config = load_config(config_path)
    rows = load_generation_rows(prepare_dataset(config, Workspace.from_env()), 6)
    adapter = Path(summary["adapter_path"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.model.base), adapter)
    answers = generate_answers(model, AutoTokenizer.from_pretrained(adapter), rows.prompts, 24, 4)
    scores = score_answers(answers, rows.references, ["exact_match", "rouge"], None, None)
    assert scores["rouge_l"] == pytest.approx(logged(history, "eval_rouge_l")[12], abs=1e-6)
    assert scores["exact_match"] == pytest.approx(logged(history, "eval_exact_match")[12], abs=1e-6)


class SpoilAtStep(TrainerCallback):
    """Adds large noise to the LoRA weights after a step, so that step's model is worse than the one before."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_" in name:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 2.0)


def test_metric_for_best_drives_early_stopping_and_keeps_the_best_checkpoint(train_config, workspace: Path) -> None:
    from safetensors.torch import load_file

    config_path = train_config(
        eval_generate={"rows": 6, "metrics": ["rouge"]},
        metric_for_best="rouge_l",
        early_stopping_patience=1,
        save_total_limit=1,
        max_steps=20,
    )
    config = load_config(config_path)
    assert config.train.metric_for_best == "eval_rouge_l" and config.train.greater_is_better()
    result = train_model(config, Workspace.from_env(), callbacks=[SpoilAtStep(12)])
    history = json.loads((Path(result.run_dir) / "history.json").read_text())
    rouge = logged(history, "eval_rouge_l")
    # `every: eval`: at every validation; the spoiled step 12 is worse than the best before it, so a patience of
    # one validation stops the 20-step run there
    assert sorted(rouge) == [4, 8, 12] and result.steps == 12
    assert rouge[12] < max(rouge[4], rouge[8])
    best_step = max(rouge, key=lambda step: (rouge[step], -step))  # the Trainer keeps the first of equal bests
    saved = load_file(Path(result.adapter_path) / "adapter_model.safetensors")
    kept = load_file(Path(result.run_dir) / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert saved.keys() == kept.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], kept[name])
    # the summary's validation loss is the kept checkpoint's, not the best loss
    assert result.eval_loss == pytest.approx(logged(history, "eval_loss")[best_step])
    # ...and the summary names the kept checkpoint and its metric
    assert (result.metric_for_best, result.best_step) == ("eval_rouge_l", best_step)
    assert result.best_metric == pytest.approx(rouge[best_step])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.metric_for_best=exact_match"], "metric_for_best 'eval_exact_match' is not computed"),
        (
            ["train.eval_generate={metrics: [rouge]}", "train.metric_for_best=eval_exact_match"],
            "this config computes eval_loss, eval_rouge_1, eval_rouge_2, eval_rouge_l",
        ),
        (["train.eval_generate={every: 6}", "train.eval_every=4"], r"every \(6\) must be a multiple"),
        (
            ["train.eval_generate={every: 8}", "train.eval_every=4", "train.metric_for_best=exact_match"],
            "set eval_generate.every: eval",
        ),
        (["train.eval_generate={metrics: []}"], "metrics"),
        (["train.eval_generate={metrics: [meteor]}"], "meteor"),
        (["train.eval_generate={rows: 0}"], "rows"),
        (["train.eval_generate={}", "train.distributed=fsdp"], "does not run under distributed.strategy fsdp"),
    ],
)
def test_bad_task_metric_settings_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_task_metrics_without_a_validation_split_are_refused(train_config) -> None:
    config = train_config(eval_generate={"rows": 4})
    result = runner.invoke(app, ["train", "-c", str(config), "--set", "data.val_fraction=0"])
    assert result.exit_code == 2, result.output
    assert "train.eval_generate needs a validation split" in result.output


def test_validation_follows_a_numeric_generation_interval() -> None:
    from tuneloop.train.schedule import plan_schedule

    settings = load_config(None, ["train.eval_generate={every: 20}", "train.max_steps=60"]).train
    schedule = plan_schedule(settings, train_samples=400)
    assert (schedule.eval_every, schedule.save_every) == (20, 20)
    assert plan_schedule(load_config(None, ["train.max_steps=60"]).train, 400).eval_every == 12


def test_qlora_gradients_stay_right_after_a_generation_eval(tiny_model_dir: Path) -> None:
    """A generation eval is a no-grad forward through the 4-bit layers (the bitsandbytes CPU trap, quant.py): the
    gradients after it must equal those of a model that never generated, and the model must be back in train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tuneloop.device import Precision
    from tuneloop.models import resolve_base
    from tuneloop.train.eval_generate import generate_answers
    from tuneloop.train.recipe import load_base_for_training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": f"Repeat the number {i}"}] for i in range(3)]

    def lora_grads(generate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = resolve_base(str(tiny_model_dir), Workspace(tiny_model_dir))
        model = load_base_for_training(base, "qlora", Precision("bf16", "test"), gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
        model.train()
        if generate_first:
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
            assert len(answers) == 3 and model.training and tokenizer.padding_side == "right"
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    reference, after_generation = lora_grads(False), lora_grads(True)
    assert reference.keys() == after_generation.keys() and reference
    first_layer = [name for name in reference if "layers.0." in name and "lora_B" in name]
    assert first_layer and all(after_generation[name].abs().sum() > 0 for name in first_layer)
    for name in reference:
        torch.testing.assert_close(after_generation[name], reference[name], atol=1e-3, rtol=1e-2)


def test_progress_shows_a_generation_bar_and_the_task_metrics() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from tuneloop.train.callbacks import RichProgressCallback, ThroughputCallback, describe_validation
    from tuneloop.train.inputs import TokenCounter

    progress = RichProgressCallback(Console(quiet=True), ThroughputCallback(TokenCounter()))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    progress.on_train_begin(None, state, None)
    assert progress.progress is not None
    with progress.generation_bar(32) as advance:
        advance(16)
        bars = [task for task in progress.progress.tasks if task.description == "generate"]
        assert len(bars) == 1 and (bars[0].completed, bars[0].total) == (16, 32)
    assert [task.description for task in progress.progress.tasks] == ["train"]
    progress.on_train_end(None, state, None)
    line = describe_validation(
        {
            "eval_loss": 0.41234,
            "eval_exact_match": 0.8125,
            "eval_runtime": 9.0,
            "eval_generate_seconds": 4.2,
            "epoch": 1,
        }
    )
    assert line == "eval_loss 0.4123, eval_exact_match 0.8125 (generation 4.2 s)"
