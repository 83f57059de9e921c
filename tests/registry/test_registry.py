from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.tiny_model import save_random_lora
from tuneloop.cli import app

runner = CliRunner()


def cli(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}


@pytest.fixture
def trained_run(train_config) -> tuple[Path, dict]:
    config = train_config(max_steps=8)
    return config, cli("train", "-c", str(config))


def test_register_alias_resolve_and_load_by_alias(trained_run, workspace: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, run = trained_run
    registered = cli("registry", "register", run["run_id"], "--name", "tiny-model", "-c", str(config))
    assert registered["name"] == "tiny-model" and registered["version"] == 1
    cli("registry", "alias", "tiny-model", "1", "challenger", "-c", str(config))
    shown = cli("registry", "show", "tiny-model@challenger", "-c", str(config))
    for key in (
        "name",
        "version",
        "aliases",
        "base_model",
        "data_fingerprint",
        "config",
        "metrics",
        "artifact_path",
        "model_card",
    ):
        assert key in shown, key
    assert shown["aliases"] == ["challenger"] and shown["data_fingerprint"] == run["dataset_id"]
    assert shown["base_model"] == str(tiny_model_dir) and shown["config"]["train"]["max_steps"] == 8
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), shown["artifact_path"])
    assert any("lora" in name for name, _ in model.named_parameters())
    # the reference resolves everywhere: evaluation takes it as --model
    result = runner.invoke(
        app,
        ["eval", "-c", str(config), "--model", "tiny-model@challenger", "--json", "--set", "eval.metrics=[perplexity]"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"]["tuned"] == "tiny-model@challenger"


def test_lineage_and_model_card(trained_run, workspace: Path) -> None:
    config, run = trained_run
    assert (
        runner.invoke(
            app,
            [
                "eval",
                "-c",
                str(config),
                "--model",
                run["run_id"],
                "--json",
                "--set",
                "eval.metrics=[perplexity, exact_match]",
            ],
        ).exit_code
        == 0
    )
    cli("registry", "register", run["run_id"], "--name", "carded", "-c", str(config))
    shown = cli("registry", "show", "carded/1", "-c", str(config))
    lineage = json.loads((Path(shown["model_card"]).parent / "lineage.json").read_text())
    for key in (
        "base_model",
        "data",
        "config",
        "training",
        "metrics",
        "evaluation",
        "chat_template",
        "generation_config",
        "libraries",
        "git_commit",
    ):
        assert key in lineage, key
    assert len(lineage["base_model"]["weights_sha256"]) == 64
    assert lineage["data"]["sources"] and lineage["libraries"]["transformers"]
    assert "<|im_start|>" in lineage["chat_template"]
    card = Path(shown["model_card"]).read_text()
    assert card.startswith("---\nbase_model:") and "model-index:" in card and "library_name: peft" in card
    assert "| perplexity |" in card and "PeftModel.from_pretrained" in card


def test_promotion_moves_champion_to_previous_and_refuses_failed_gates(trained_run, workspace: Path) -> None:
    config, run = trained_run
    cli("registry", "register", run["run_id"], "--name", "promoted", "-c", str(config))
    cli("registry", "register", run["run_id"], "--name", "promoted", "-c", str(config))
    cli("registry", "promote", "promoted", "1", "-c", str(config))
    outcome = cli("registry", "promote", "promoted", "2", "-c", str(config))
    assert outcome["champion"] == 2 and outcome["previous"] == 1
    assert cli("registry", "show", "promoted@previous", "-c", str(config))["version"] == 1
    # a version whose gates failed is refused unless forced
    failing = ["--set", "eval.metrics=[perplexity]", "--set", "eval.gates={perplexity_improvement: 0.99}"]
    assert runner.invoke(app, ["eval", "-c", str(config), "--model", run["run_id"], *failing]).exit_code == 0
    cli("registry", "register", run["run_id"], "--name", "promoted", "-c", str(config))
    refused = runner.invoke(app, ["registry", "promote", "promoted", "3", "-c", str(config)])
    assert refused.exit_code == 2 and "failed its evaluation gates (perplexity_improvement)" in refused.output
    assert cli("registry", "promote", "promoted", "3", "--force", "-c", str(config))["champion"] == 3
    diff = cli("registry", "diff", "promoted", "1", "3", "-c", str(config))
    assert "eval_perplexity" in diff["metrics"] and diff["data_fingerprint"]["changed"] is False


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 101, "bad name"])
def test_bad_names_are_rejected(trained_run, name: str) -> None:
    config, run = trained_run
    result = runner.invoke(app, ["registry", "register", run["run_id"], "--name", name, "-c", str(config)])
    assert result.exit_code == 2 and "invalid model name" in result.output


def test_two_parallel_registrations_both_land(trained_run, workspace: Path) -> None:
    config, run = trained_run
    command = [
        sys.executable,
        "-m",
        "tuneloop.cli",
        "registry",
        "register",
        run["run_id"],
        "--name",
        "parallel",
        "-c",
        str(config),
        "--json",
    ]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    versions = sorted(json.loads(out)["version"] for out, _ in outputs)
    assert versions == [1, 2]
    listing = cli("registry", "list", "-c", str(config))
    assert [v["version"] for v in listing["parallel"]] == [1, 2]


def test_merged_export_matches_the_adapter(trained_run, tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, run = trained_run
    exported = cli("export", run["run_id"], "--format", "merged", "--out", str(tmp_path / "merged"), "-c", str(config))
    assert exported["parity_max_abs_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run["adapter_path"])
    ids = torch.tensor([[5, 17, 33, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    peft_copy = cli("export", run["run_id"], "--format", "peft", "--out", str(tmp_path / "peft"), "-c", str(config))
    assert (Path(peft_copy["path"]) / "adapter_model.safetensors").exists()


def test_train_registers_automatically_when_a_name_is_set(train_config) -> None:
    config = train_config(max_steps=4)
    summary = cli("train", "-c", str(config), "--set", "registry.name=auto-registered")
    assert summary["registry"]["name"] == "auto-registered" and summary["registry"]["version"] == 1


@pytest.mark.slow
def test_gguf_exports_read_back(smollm2_workspace: Path, tmp_path: Path) -> None:
    """llama.cpp's converters (from the llama-cpp-python sdist) on the real SmolLM2: full model and a LoRA adapter."""

    smollm2 = smollm2_workspace / "models" / "smollm2-135m-instruct"
    exported = cli("export", "base", "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "gguf"))
    assert exported["architecture"] == "llama" and exported["tensors"] > 100
    assert Path(exported["path"]).name == "model-q8_0.gguf"
    adapter = save_random_lora(smollm2, tmp_path / "adapter", r=4)
    lora = cli("export", str(adapter), "--format", "gguf-lora", "--out", str(tmp_path / "gguf-lora"))
    assert lora["tensors"] == 30 * 2 * 2  # 30 layers x (q, v) x (A, B)
    # k-quants go through llama-quantize (`make llamacpp`, which `make test` runs): a smaller file that reads back.
    quantized = cli("export", "base", "--format", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "q4"))
    assert quantized["tensors"] == exported["tensors"] and quantized["bytes"] < exported["bytes"] * 0.8
    missing = runner.invoke(
        app,
        ["export", "base", "--format", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "q4b")],
        env={"TUNELOOP_LLAMA_QUANTIZE": str(tmp_path / "no-such-binary")},
    )
    assert missing.exit_code == 2 and "llama-quantize" in missing.output
