"""`tuneloop dvc init`: the loop as a DVC pipeline, run by the real `dvc` in a temporary git repository.

`dvc repro` runs prepare -> train -> eval -> register; a second `dvc repro` does nothing; a changed train param
reruns train and what follows but not prepare; `dvc push` / `dvc pull` version the prepared data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli import app

VENV_BIN = Path(sys.executable).parent
DVC = VENV_BIN / "dvc"
runner = CliRunner()
STAGES = ("prepare", "train", "eval", "register")


def run(repo: Path, *command: str) -> str:
    """A command in the repository with this venv's `tuneloop` and `dvc` on PATH; its output (stdout + stderr)."""
    environment = {key: value for key, value in os.environ.items() if key != "TUNELOOP_HOME"}
    environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '')}"
    done = subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


@pytest.fixture
def repo(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repository holding a tiny config (2 training steps, 3 evaluated rows) and its data."""
    if not DVC.exists():
        pytest.skip(f"dvc is not installed in this environment ({DVC}): `make setup` installs it (the dev extra)")
    monkeypatch.delenv("TUNELOOP_HOME", raising=False)
    folder = tmp_path / "repo"
    folder.mkdir()
    run(folder, "git", "init", "-q")
    run(folder, "git", "config", "user.email", "test@example.com")
    run(folder, "git", "config", "user.name", "test")
    run(folder, str(DVC), "init", "-q")
    rows = [{"instruction": f"Repeat the number {n}", "output": f"number {n} is {n}"} for n in range(40)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "project": {"name": "tiny"},
        "model": {"base": str(tiny_model_dir)},
        "data": {
            "sources": [{"path": "rows.jsonl"}],
            "max_seq_len": 128,
            "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
        },
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 0.01,
            "eval_every": 2,
            "save_every": 2,
            "compile": False,
            "lora": {"r": 4, "alpha": 8},
        },
        "eval": {"engine": "inprocess", "limit": 3, "max_new_tokens": 8, "metrics": ["perplexity", "exact_match"]},
        "registry": {"name": "tiny-dvc"},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(folder)
    return folder


def cli(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.mark.slow
def test_dvc_repro_reruns_what_changed_and_push_versions_the_data(repo: Path, tmp_path: Path) -> None:
    written = cli("dvc", "init", "-c", "config.yaml")
    stages = written["stages"]
    assert list(stages) == list(STAGES)
    assert stages["prepare"]["params"] == ["model", "data"] and stages["train"]["params"] == ["model", "train"]
    assert stages["prepare"]["deps"][0] == "rows.jsonl"
    assert ".tuneloop/datasets" in stages["prepare"]["outs"]
    dvc_file = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert "tuneloop data prepare -c config.yaml" in dvc_file["prepare"]["cmd"]
    assert dvc_file["eval"]["metrics"] == [{"tuneloop-steps/eval.json": {"cache": False}}]

    first = run(repo, str(DVC), "repro")
    assert ran(first) == list(STAGES)
    steps = repo / "tuneloop-steps"
    trained = json.loads((steps / "train.json").read_text())
    evaluated = json.loads((steps / "eval.json").read_text())
    registered = json.loads((steps / "register.json").read_text())
    assert json.loads((steps / "prepare.json").read_text())["train_rows"] > 0
    assert evaluated["models"]["tuned"] == trained["run_id"]
    assert registered["run_id"] == trained["run_id"] and registered["version"] == 1
    metrics = json.loads(run(repo, str(DVC), "metrics", "show", "--json"))
    assert "tuned" in json.dumps(metrics) and "perplexity" in json.dumps(metrics)

    second = run(repo, str(DVC), "repro")
    assert ran(second) == []
    assert all(f"Stage '{stage}' didn't change, skipping" in second for stage in STAGES)
    assert "Data and pipelines are up to date." in run(repo, str(DVC), "status")

    config = yaml.safe_load((repo / "config.yaml").read_text())
    config["train"]["learning_rate"] = 0.02
    (repo / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    third = run(repo, str(DVC), "repro")
    assert "Stage 'prepare' didn't change, skipping" in third
    assert ran(third) == ["train", "eval", "register"]
    retrained = json.loads((steps / "train.json").read_text())
    assert retrained["run_id"] != trained["run_id"]
    assert json.loads((steps / "register.json").read_text())["version"] == 2

    # dvc push versions the prepared data: gone from the workspace and the cache, dvc pull brings it back
    datasets = repo / ".tuneloop" / "datasets"
    before = {path.relative_to(datasets): path.read_bytes() for path in datasets.rglob("*") if path.is_file()}
    assert any(path.name == "manifest.json" for path in before)
    remote = tmp_path / "dvc-remote"
    run(repo, str(DVC), "remote", "add", "-d", "local", str(remote))
    pushed = run(repo, str(DVC), "push")
    assert f"{len(before) + 1} files pushed" in pushed  # the dataset's files and DVC's listing of the folder
    shutil.rmtree(datasets)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(repo, str(DVC), "pull")
    after = {path.relative_to(datasets): path.read_bytes() for path in datasets.rglob("*") if path.is_file()}
    assert after == before
    assert "Data and pipelines are up to date." in run(repo, str(DVC), "status")


def test_dvc_init_refuses_outside_a_repository_and_over_an_existing_file(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNELOOP_HOME", raising=False)
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"model": {"base": str(tiny_model_dir)}, "data": {"sources": [{"path": "rows.jsonl"}]}})
    )
    monkeypatch.chdir(folder)

    def refused(*args: str) -> str:
        result = runner.invoke(app, ["dvc", "init", "-c", "config.yaml", *args, "--json"])
        assert result.exit_code == 2, result.output
        return json.loads(result.stdout)["error"]

    assert "is not inside a git repository" in refused()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    assert "is a git repository but not a DVC repository" in refused()
    (folder / ".dvc").mkdir()  # what `dvc init` makes (the refusal only looks for it)
    assert "the workspace (DVC tracks its datasets folder) is outside the repository" in refused(
        "--workspace", str(tmp_path / "elsewhere")
    )
    cli("dvc", "init", "-c", "config.yaml")
    assert "dvc.yaml exists" in refused()
    assert "register" not in cli("dvc", "init", "-c", "config.yaml", "--force")["stages"]  # no registry.name

    (folder / "tuneloop-steps" / "train.json").write_text(json.dumps({"run_id": "r-1"}))
    value = runner.invoke(app, ["dvc", "value", "tuneloop-steps/train.json", "run_id"])
    assert value.exit_code == 0 and value.stdout.strip() == "r-1"
    missing = runner.invoke(app, ["dvc", "value", "tuneloop-steps/train.json", "run"])
    assert missing.exit_code == 2 and "has no 'run'" in missing.output
