"""`tuneloop export --format gptq|awq`: 4-bit weights by llm-compressor (from .venv-quant, `make quant`) in the
compressed-tensors format vLLM loads, calibrated on a real dataset, checked by reloading the saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.registry.export import default_quant_python

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def export(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, ["export", *args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else {"output": result.output}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_w4a16_export_reloads_and_reports_agreement(
    method: str, tiny_model_dir: Path, shared_data: Path, tmp_path: Path, workspace: Path, monkeypatch
) -> None:
    monkeypatch.chdir(REPO)  # the default quantisation python is .venv-quant/bin/python in the repository
    if not default_quant_python().exists():
        pytest.skip("the quantisation virtualenv is missing: run `make quant`")
    calibration = shared_data / "stanford_alpaca_1k" / "alpaca_data_1k.json"
    out = tmp_path / method
    result = export(str(tiny_model_dir), "--format", method, "--calibration", str(calibration), "--out", str(out))
    assert result["format"] == method and result["calibration_texts"] == 128 and result["held_out_texts"] == 16
    assert result["read_back_max_abs_diff"] < 1e-3  # the saved checkpoint gives the logits it was measured with
    assert 0.0 <= result["top1_agreement"] <= 1.0 and result["mean_kl"] >= 0.0
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    weights = next(iter(quantization["config_groups"].values()))["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == result["group_size"] == 64
    assert weights["symmetric"] is (method == "gptq")  # GPTQ's symmetric int4 groups, AWQ's asymmetric ones
    assert "lm_head" in quantization["ignore"]
    assert json.loads((out / "tuneloop_quantization.json").read_text())["top1_agreement"] == result["top1_agreement"]


def test_w4a16_export_needs_calibration_data(tiny_model_dir: Path, workspace: Path) -> None:
    failed = export(str(tiny_model_dir), "--format", "gptq", code=2)
    assert "--calibration" in failed["output"]


def test_w4a16_export_names_the_missing_virtualenv(
    tiny_model_dir: Path, workspace: Path, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("TUNELOOP_QUANT_PYTHON", str(tmp_path / "nowhere" / "python"))
    calibration = tmp_path / "texts.jsonl"
    calibration.write_text("".join(json.dumps({"text": f"sample text number {i}"}) + "\n" for i in range(40)))
    failed = export(str(tiny_model_dir), "--format", "awq", "--calibration", str(calibration), code=2)
    assert "make quant" in failed["output"]
