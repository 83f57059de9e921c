"""`tuneloop run` end to end on the tiny model: every step, a fully cached second run, and a crash injected between
steps that the next run resumes from (finished steps skipped, the same training run reused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.errors import TuneloopError
from tuneloop.pipeline import run as pipeline
from tuneloop.pipeline.run import STEPS

runner = CliRunner()


def run_loop(config: Path, workspace: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["run", "-c", str(config), "--workspace", str(workspace), "--json", *extra])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def loop_config(train_config, gate: float) -> Path:
    path = train_config(max_steps=6, eval_every=3, save_every=3)
    config = yaml.safe_load(path.read_text())
    config["eval"] = {"metrics": ["perplexity"], "gates": {"perplexity_max": gate}, "limit": 4}
    config["registry"] = {"name": "tiny-loop"}
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_all_steps_then_everything_cached(train_config, tmp_path: Path) -> None:
    config = loop_config(train_config, gate=1e9)
    code, first = run_loop(config, tmp_path / "ws")
    assert code == 0, first
    assert first["steps_skipped"] == []
    assert first["dataset_id"].startswith("ds-") and first["run_id"]
    assert first["registry"] == {"name": "tiny-loop", "version": 1, "aliases": ["champion"]}
    assert first["promoted"] is True and first["gates"] == {"perplexity_max": "pass"}
    assert set(first["metrics"]) == {"tuned", "base"}
    assert first["metrics"]["tuned"]["perplexity"] < first["metrics"]["base"]["perplexity"]

    code, second = run_loop(config, tmp_path / "ws")
    assert code == 0
    assert second["steps_skipped"] == list(STEPS)
    assert second["run_id"] == first["run_id"] and second["registry"] == first["registry"]
    assert second["metrics"] == first["metrics"]


def test_run_resumes_after_a_failure_between_steps_and_keeps_a_failing_model_out(
    train_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = loop_config(train_config, gate=1.0)  # perplexity <= 1: fails, so no promotion

    def crash(*args: object, **kwargs: object) -> None:  # a crash right after training, before evaluation
        raise TuneloopError("injected failure after step train")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_evaluate", crash)
        code, crashed = run_loop(config, tmp_path / "ws")
    assert code == 2 and "injected failure after step train" in crashed["error"]
    runs = list((tmp_path / "ws" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").exists()

    code, resumed = run_loop(config, tmp_path / "ws")
    assert code == 0, resumed
    assert resumed["steps_skipped"] == ["prepare", "train"]
    assert resumed["run_id"] == runs[0].name
    assert resumed["gates"] == {"perplexity_max": "fail"} and resumed["promoted"] is False
    assert resumed["registry"] == {"name": "tiny-loop", "version": 1, "aliases": []}
