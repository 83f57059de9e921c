"""The workspace layout (`tuneloop.workspace`) and the rule that no other module spells a workspace file name."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from tuneloop.workspace import Workspace

SRC = Path(__file__).resolve().parents[1] / "src" / "tuneloop"
# Every file name of the layout: only workspace.py may write these as string literals.
LAYOUT_NAMES = (
    "summary.json",
    "run.json",
    "history.json",
    "pipeline.json",
    "manifest.json",
    "metrics.json",
    "lineage.json",
    "quarantine.jsonl",
    "feedback.jsonl",
    "traffic.jsonl",
    "mlflow.db",
    "sweeps.db",
    "registry.lock",
    "cost.md",
    "pairwise_key.json",
    "token_lengths.png",
    "mlartifacts",
    "registry-downloads",
    "vllm-zero-lora",
    "content-hashes.json",
    "pairwise.csv",
    "pairwise.jsonl",
    "report.html",
    "report.md",
    "rank-",
    "builtin-",
)
# Code that must use the accessors too: the package, and the benchmarks and examples beside it.
SCANNED = (SRC, SRC.parents[1] / "benchmarks", SRC.parents[1] / "examples")


def test_layout_paths(tmp_path: Path) -> None:
    space = Workspace(tmp_path)
    run = space.run("r1")
    assert run.root == tmp_path / "runs" / "r1" and run.run_id == "r1"
    assert run.summary.parent == run.record.parent == run.config.parent == run.history.parent == run.root
    assert run.output("full") == run.model and run.output("lora") == run.adapter == run.root / "adapter"
    assert run.checkpoints.parent == run.root and run.evals.parent == run.root
    dataset = space.dataset("ds-1")
    assert dataset.manifest.parent == dataset.root == tmp_path / "datasets" / "ds-1"
    assert dataset.parquet("train").name == "train.parquet" and dataset.conversations("val").name == "val.jsonl"
    assert space.dataset_staging("ds-1").root.parent == space.datasets
    assert space.version("m", 3).lineage == tmp_path / "registry" / "m" / "3" / "lineage.json"
    assert space.serve.feedback.parent == space.serve.root == tmp_path / "serve"
    assert space.mlflow_db.parent == space.registry_lock.parent == space.sweeps_db.parent == tmp_path
    assert space.export_dir("name@champion", "gguf").parent == space.exports
    assert not any(tmp_path.iterdir()), "accessors build paths; they create nothing"


def test_version_names_cannot_leave_the_registry_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        Workspace(tmp_path).version("../../etc", 1)


def test_run_listing_and_latest_finished(tmp_path: Path) -> None:
    space = Workspace(tmp_path)
    assert space.run_ids() == [] and space.latest_finished_run() is None
    for run_id in ("a", "b", "c"):
        space.ensure(space.run(run_id).root)
        space.run(run_id).record.write_text("{}")
    for run_id in ("b", "a"):  # finished in this order: "a" last
        space.run(run_id).summary.write_text("{}")
        time.sleep(0.01)
    assert space.run_ids() == ["a", "b", "c"]
    assert space.latest_finished_run() == "a"


def test_from_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "env"))
    assert Workspace.from_env().root == tmp_path / "env"
    assert Workspace.from_env(tmp_path / "flag").root == tmp_path / "flag"


def test_no_other_module_spells_a_workspace_file_name() -> None:
    offenders = []
    for path in sorted(file for folder in SCANNED for file in folder.rglob("*.py")):
        if path.name == "workspace.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            # Path literals have no spaces; sentences (messages that name a file for the user) are not paths.
            # Jinja templates (`report.html.j2`) are package files, not workspace ones.
            is_path_literal = (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and " " not in node.value
                and not node.value.endswith(".j2")
            )
            if is_path_literal and id(node) not in docstrings:
                offenders += [f"{path.name}:{node.lineno}: {name}" for name in LAYOUT_NAMES if name in node.value]
    assert offenders == []
