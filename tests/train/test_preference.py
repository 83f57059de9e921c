"""Preference tuning on the tiny model: DPO raises the chosen-vs-rejected log-probability margin on held-out pairs
(measured from the saved adapter), DPO continues an SFT parent whose adapter is its reference and lands in the
registry with its lineage, a crashed DPO run resumes, and ORPO runs end to end through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import write_jsonl
from tests.train.hooks import CrashAtStep
from tuneloop.cli import app
from tuneloop.config_file import load_config
from tuneloop.train.recipe import train_model
from tuneloop.workspace import Workspace

pytestmark = pytest.mark.slow

runner = CliRunner()


def cli(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _pair(number: int) -> dict[str, Any]:
    """Chosen answers follow one pattern, rejected ones another (the layout `data from-feedback` writes)."""
    return {
        "prompt": [{"role": "user", "content": f"Say the number {number}"}],
        "chosen": [{"role": "assistant", "content": f"The number is {number}."}],
        "rejected": [{"role": "assistant", "content": f"No {number} no no."}],
    }


NUMBERS = list(range(100))
random.Random(7).shuffle(NUMBERS)
TRAIN_NUMBERS, HELD_OUT_NUMBERS = NUMBERS[:48], NUMBERS[80:]


def _config(tmp_path: Path, model: Path, source: Path, name: str = "pref.yaml", **train: Any) -> Path:
    config = {
        "project": {"name": "tiny-pref"},
        "model": {"base": str(model)},
        "data": {
            "sources": [{"path": str(source)}],
            "max_seq_len": 64,
            "val_fraction": 0.1,
            "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
        },
        "train": {
            "method": "dpo",
            "max_steps": 24,
            "batch_size": 4,
            "learning_rate": 0.003,
            "eval_every": 8,
            "save_every": 8,
            "logging_every": 4,
            "system_metrics": False,
            "lora": {"r": 8, "alpha": 16},
            **train,
        },
        "eval": {"engine": "inprocess"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    source = write_jsonl(tmp_path / "pairs.jsonl", [_pair(number) for number in TRAIN_NUMBERS])
    provenance = {"generator": "tuneloop data from-feedback", "feedback_window": {"from": 100.0, "to": 200.0}}
    (tmp_path / "pairs.jsonl.provenance.json").write_text(json.dumps(provenance))
    return source


def _margins(model_dir: Path, adapter: Path | None, numbers: list[int]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt), answers rendered by the chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    def answer_logp(prompt: list[dict], answer: list[dict]) -> float:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + answer, return_dict=True)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        ids = torch.tensor([full_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        picked = logps.gather(1, targets[:, None])[:, 0]
        return float(picked[len(prompt_ids) - 1 :].sum())

    margins = []
    for number in numbers:
        pair = _pair(number)
        margins.append(answer_logp(pair["prompt"], pair["chosen"]) - answer_logp(pair["prompt"], pair["rejected"]))
    return sum(margins) / len(margins)


def test_dpo_raises_the_held_out_margin(tmp_path: Path, tiny_model_dir: Path, workspace: Path, pairs: Path) -> None:
    before = _margins(tiny_model_dir, None, HELD_OUT_NUMBERS)
    summary = cli("train", "-c", str(_config(tmp_path, tiny_model_dir, pairs)))
    assert summary["method"] == "dpo" and summary["steps"] == 24 and summary["tokens"] > 0
    assert summary["preference"]["reference_model"] == "base model" and summary["parent"] is None
    adapter = Path(summary["adapter_path"])
    assert not (adapter / "ref").exists()  # the policy adapter only
    after = _margins(tiny_model_dir, adapter, HELD_OUT_NUMBERS)
    assert after > before + 5.0, (before, after)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    margins = [entry["rewards/margins"] for entry in history if "rewards/margins" in entry]
    assert margins and margins[-1] > margins[0]
    assert any("eval_rewards/accuracies" in entry for entry in history)
    # tracked in MLflow under TRL's names ("/" becomes "_" in MLflow metric names)
    from mlflow.tracking import MlflowClient

    from tuneloop.tracking import tracking_uri

    client = MlflowClient(tracking_uri(Workspace.from_env(), None))
    logged = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert {"loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "eval_rewards_accuracies"} <= set(logged)


def test_dpo_on_an_sft_parent_registers_with_its_lineage(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path, pairs: Path
) -> None:
    sft_rows = [{"instruction": f"Say the number {n}", "output": f"The number is {n}."} for n in TRAIN_NUMBERS]
    sft_source = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft_config = _config(tmp_path, tiny_model_dir, sft_source, "sft.yaml", method="lora", max_steps=8)
    parent = cli("train", "-c", str(sft_config))
    cli("registry", "register", parent["run_id"], "--name", "tiny-sft", "-c", str(sft_config))

    config = _config(tmp_path, tiny_model_dir, pairs, max_steps=8, preference={"parent": "tiny-sft/1", "beta": 0.2})
    summary = cli("train", "-c", str(config))
    assert summary["parent"]["run_id"] == parent["run_id"] and summary["parent"]["version"] == "tiny-sft/1"
    assert summary["preference"] == {"beta": 0.2, "loss_type": "sigmoid", "reference_model": "parent adapter"}
    adapter = Path(summary["adapter_path"])
    # the parent's adapter, trained further: same LoRA shape, other weights
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert not (adapter / "ref").exists()
    assert _margins(tiny_model_dir, adapter, HELD_OUT_NUMBERS) > _margins(
        tiny_model_dir, Path(parent["adapter_path"]), HELD_OUT_NUMBERS
    )

    registered = cli("registry", "register", summary["run_id"], "--name", "tiny-dpo", "-c", str(config))
    lineage = json.loads(
        (workspace / "registry" / "tiny-dpo" / str(registered["version"]) / "lineage.json").read_text()
    )
    assert lineage["method"] == "dpo"
    assert lineage["parent"]["run_id"] == parent["run_id"] and lineage["parent"]["version"] == "tiny-sft/1"
    assert lineage["data"]["kind"] == "preference"
    assert lineage["data"]["provenance"][str(pairs)]["feedback_window"] == {"from": 100.0, "to": 200.0}


def test_a_crashed_dpo_run_resumes_to_the_same_loss(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path, pairs: Path
) -> None:
    config_path = _config(tmp_path, tiny_model_dir, pairs, max_steps=16)
    uninterrupted = train_model(load_config(config_path), Workspace.from_env())
    with pytest.raises(RuntimeError, match="injected crash"):
        train_model(load_config(config_path), Workspace.from_env(), callbacks=[CrashAtStep(10)])
    resumed = cli("train", "-c", str(config_path), "--resume")
    assert resumed["resumed_from"].endswith("checkpoint-8")
    assert resumed["run_id"] != uninterrupted.run_id and resumed["steps"] == 16
    assert resumed["train_loss"] == pytest.approx(uninterrupted.train_loss, abs=1e-3)
    assert resumed["eval_loss"] == pytest.approx(uninterrupted.eval_loss, abs=1e-3)


def test_orpo_runs_end_to_end_through_the_cli(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path, pairs: Path
) -> None:
    summary = cli("train", "-c", str(_config(tmp_path, tiny_model_dir, pairs, method="orpo", max_steps=8)))
    assert summary["method"] == "orpo" and summary["steps"] == 8
    assert summary["preference"]["reference_model"] is None
    adapter = Path(summary["adapter_path"])
    assert (adapter / "adapter_model.safetensors").exists()
    from tuneloop.artifacts.training import TrainResult

    assert TrainResult.load(Path(summary["run_dir"]) / "summary.json").method == "orpo"
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert any("log_odds_ratio" in entry for entry in history)


def test_preference_method_on_sft_rows_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    source = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"say {n}", "output": f"{n}"} for n in range(20)])
    result = runner.invoke(app, ["train", "-c", str(_config(tmp_path, tiny_model_dir, source))])
    assert result.exit_code != 0
    assert "preference pairs" in result.output
