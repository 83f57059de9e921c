from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.train.hooks import CrashAtStep
from tuneloop.cli import app
from tuneloop.config_file import load_config
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.monitor.gpu import gpu_collector
from tuneloop.train.recipe import train_model
from tuneloop.workspace import Workspace

runner = CliRunner()


def train_cli(config: Path, *args: str) -> dict:
    result = runner.invoke(app, ["train", "-c", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_lora_loss_decreases_and_adapter_loads_with_plain_peft(train_config, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train_cli(train_config())
    assert summary["steps"] == 12 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["mlflow_run_id"]
    history = json.loads(
        (Path(summary["run_dir"]) / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
    )["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.3
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert evals[-1] < evals[0]
    adapter = Path(summary["adapter_path"])
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (adapter / name).exists(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer("number 3 is", return_tensors="pt")
    with torch.no_grad():
        with tuned.disable_adapter():
            plain = tuned(**ids).logits
        adapted = tuned(**ids).logits
    assert not torch.allclose(plain, adapted)


def test_resume_after_a_crash_reaches_the_same_loss(train_config, workspace: Path) -> None:
    config_path = train_config()
    uninterrupted = train_model(load_config(config_path), Workspace.from_env())
    crashed_config = load_config(config_path, ["train.seed=42"])
    with pytest.raises(RuntimeError, match="injected crash"):
        train_model(crashed_config, Workspace.from_env(), callbacks=[CrashAtStep(6)])
    resumed = train_cli(config_path, "--resume")
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["run_id"] != uninterrupted.run_id
    assert resumed["steps"] == 12
    assert resumed["train_loss"] == pytest.approx(uninterrupted.train_loss, abs=1e-4)
    assert resumed["eval_loss"] == pytest.approx(uninterrupted.eval_loss, abs=1e-4)
    # the resumed run logs into the same MLflow run as its first attempt
    record = json.loads((Path(resumed["run_dir"]) / "run.json").read_text())
    assert record["attempts"] == 2 and record["status"] == "finished"


def test_mlflow_run_has_params_metrics_tags_and_artifacts(train_config, workspace: Path) -> None:
    from mlflow import MlflowClient

    summary = train_cli(train_config())
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lora.r"] == "8" and run.data.params["train.learning_rate"] == "0.01"
    assert run.data.tags["tuneloop.data_fingerprint"] == summary["dataset_id"]
    for metric in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb", "eval_loss"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 5
    # train.system_metrics (on by default): MLflow's system metrics, CPU and memory on any machine, GPUs via NVML
    for metric in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert metric in run.data.metrics, metric
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    gpu_series = [name for name in run.data.metrics if name.startswith("system/gpu_")]
    assert bool(gpu_series) == (gpu_collector() is not None), gpu_series
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "summary.json", "config.json", "report.html"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {
        item.path for item in client.list_artifacts(run.info.run_id, "adapter")
    }
    with sqlite3.connect(workspace / "mlflow.db") as db:  # a real SQLite store in the workspace
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_system_metrics_off_logs_none(train_config, workspace: Path) -> None:
    from mlflow import MlflowClient

    summary = train_cli(train_config(max_steps=2, system_metrics=False))
    run = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert "loss" in run.data.metrics
    assert not [name for name in run.data.metrics if name.startswith("system/")]


def training_losses(summary: dict) -> list[float]:
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


def test_full_fine_tuning_writes_safetensors(train_config) -> None:
    from transformers import AutoModelForCausalLM

    summary = train_cli(train_config(method="full", learning_rate=0.001, report_to=[]))
    assert summary["adapter_path"] is None and summary["mlflow_run_id"] is None
    losses = training_losses(summary)  # steps 1, 2, 4, ..., 12
    assert len(losses) == 7 and losses[-1] < losses[0] - 0.5, losses
    model_dir = Path(summary["model_path"])
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_unknown_target_module_is_a_clear_error(train_config) -> None:
    result = runner.invoke(app, ["train", "-c", str(train_config()), "--set", "train.lora.target_modules=[qkv_proj]"])
    assert result.exit_code == 2
    assert "'qkv_proj' not found in the model" in result.output and "q_proj" in result.output


def test_keep_best_needs_aligned_steps() -> None:
    with pytest.raises(ConfigError, match="multiple of eval_every"):
        load_config(None, ["train.save_every=10", "train.eval_every=4"])


def test_qlora_without_a_backend_fails_fast(train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine without a 4-bit backend cannot be had here (bitsandbytes works on this CPU): hide the module.
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    result = runner.invoke(app, ["train", "-c", str(train_config(method="qlora"))])
    assert result.exit_code == 2
    assert "needs a 4-bit backend" in result.output and "never silently" in result.output


def test_memory_preflight_stops_with_advice() -> None:
    from transformers import LlamaConfig

    from tuneloop.train.memory import estimate_memory, preflight

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000
    )
    estimate = estimate_memory(config, "full", 16, 16, 2048, "fp32", False)
    with pytest.raises(TuneloopError) as error:
        preflight(estimate, available_mb=8000, mode="stop")
    assert "gradient_checkpointing" in (error.value.hint or "") and "qlora" in (error.value.hint or "")
    assert "needs ~" in preflight(estimate, available_mb=8000, mode="warn")
    assert preflight(estimate, available_mb=8000, mode="off") is None
    smaller = estimate_memory(config, "qlora", 16, 1, 512, "bf16", True)
    assert smaller.total_mb < estimate.total_mb / 10


def test_qlora_trains_through_the_cli_and_says_which_backend_ran(train_config) -> None:
    summary = train_cli(train_config(method="qlora", report_to=[]))
    assert summary["quantization"].startswith("bitsandbytes") and "NF4 + double quantisation" in summary["quantization"]
    assert (Path(summary["adapter_path"]) / "adapter_model.safetensors").exists()
    # 12 steps with validations at 4 and 8 in between: the 4-bit base keeps learning after each eval pass
    losses = training_losses(summary)
    assert len(losses) == 7 and losses[-1] < losses[0] - 0.3, losses


def test_qlora_gradients_are_right_after_an_eval_pass(tiny_model_dir: Path) -> None:
    """The bitsandbytes CPU trap: a no-grad forward repacks 4-bit weights into an inference layout without backward,
    and later gradients silently go wrong. tuneloop's loader must give the same gradients as a model never evaluated."""
    from peft import LoraConfig, get_peft_model

    from tuneloop.device import Precision
    from tuneloop.models import resolve_base
    from tuneloop.train.recipe import load_base_for_training

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = resolve_base(str(tiny_model_dir), Workspace(tiny_model_dir))
        model = load_base_for_training(base, "qlora", Precision("bf16", "test"), gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    reference, after_eval = lora_grads(False), lora_grads(True)
    assert reference.keys() == after_eval.keys() and reference
    first_layer = [name for name in reference if "layers.0." in name and "lora_B" in name]
    assert first_layer and all(reference[name].abs().sum() > 0 for name in first_layer)
    for name in reference:
        torch.testing.assert_close(after_eval[name], reference[name], atol=1e-3, rtol=1e-2)


def test_sweep_runs_trials_prunes_and_marks_the_best(train_config, workspace: Path) -> None:
    config = train_config(
        max_steps=8,
        eval_every=2,
        save_every=4,
        sweep={"space": {"learning_rate": {"low": 0.0005, "high": 0.05, "log": True}, "lora.r": {"choices": [4, 8]}}},
    )
    outcome = train_cli(config, "--sweep", "4")
    assert len(outcome["trials"]) == 4
    states = {trial["state"] for trial in outcome["trials"]}
    assert states <= {"complete", "pruned"} and "complete" in states
    best = [trial for trial in outcome["trials"] if trial["best"]]
    assert len(best) == 1 and best[0]["number"] == outcome["best_trial"]
    assert best[0]["value"] == min(t["value"] for t in outcome["trials"] if t["state"] == "complete")
    assert set(outcome["best_params"]) == {"learning_rate", "lora.r"}
    assert (workspace / "sweeps.db").exists()
    assert json.loads((Path(outcome["storage"]).parent / "sweeps" / f"{outcome['study']}.json").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    run_id = json.loads((workspace / "runs" / best[0]["run_id"] / "run.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["tuneloop.sweep_best"] == "true"
    for trial in outcome["trials"]:  # the sweep labels its pruned trials itself (the recipe only knows "failed")
        record = json.loads((workspace / "runs" / trial["run_id"] / "run.json").read_text())
        assert record["status"] == {"complete": "finished", "pruned": "pruned"}[trial["state"]]


def test_sweep_without_a_space_or_with_a_bad_key_is_refused(train_config) -> None:
    result = runner.invoke(app, ["train", "-c", str(train_config()), "--sweep", "2"])
    assert result.exit_code == 2 and "train.sweep.space" in result.output
    bad = train_config(sweep={"space": {"lr": {"low": 0.001, "high": 0.01}}})
    result = runner.invoke(app, ["train", "-c", str(bad), "--sweep", "2"])
    assert result.exit_code == 2 and "train.lr: unknown key" in result.output
