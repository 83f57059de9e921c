"""Step identity (`tuneloop.keys`): which config change invalidates which cached step, stated as a table.

Computed the way the stages compute them (the dataset id from sources + tokenizer, the run key from the train
section + base weights + dataset id, the eval key from run + eval section + dataset), on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tuneloop.config_file import load_config
from tuneloop.data.prepare import dataset_identity
from tuneloop.keys import eval_key
from tuneloop.train.runs import run_key_for
from tuneloop.workspace import Workspace

# override -> (dataset changes, training changes, evaluation changes)
TABLE: list[tuple[str, tuple[bool, bool, bool]]] = [
    ("project.name=renamed", (False, False, False)),
    ("registry.name=some-model", (False, False, False)),
    ("serve.port=9001", (False, False, False)),
    ("train.sweep.prune=false", (False, False, False)),
    # Operational settings: raising a timeout to resume a timed-out job must find the same run.
    ("train.distributed.timeout_minutes=90", (False, False, False)),
    ("train.distributed.backend=gloo", (False, False, False)),
    ("train.preflight=warn", (False, False, False)),
    ("train.report_to=[]", (False, False, False)),
    ("train.num_threads=1", (False, False, False)),
    ("train.logging_every=1", (False, False, False)),
    # The strategy changes the checkpoints' format: a DDP checkpoint is no FSDP resume point.
    ("train.distributed=fsdp", (False, True, True)),
    ("train.distributed.cpu_offload=true", (False, True, True)),
    ("eval.limit=5", (False, False, True)),
    ("eval.max_new_tokens=7", (False, False, True)),
    ("eval.gates={perplexity_max: 10}", (False, False, True)),
    # Without task metrics during training, how answers are parsed matters to evaluation only.
    ("eval.labels=[good, bad]", (False, False, True)),
    ("train.eval_generate={rows: 4}", (False, True, True)),
    ("train.learning_rate=0.001", (False, True, True)),
    ("train.lora.r=4", (False, True, True)),
    ("train.max_steps=3", (False, True, True)),
    ("data.seed=7", (True, True, True)),
    ("data.max_seq_len=64", (True, True, True)),
    ("data.packing=false", (True, True, True)),
    # The tiny model's own template is ChatML: naming it changes no token, so nothing reruns; another one does.
    ("model.chat_template=chatml", (False, False, False)),
    ("model.chat_template='{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}'", (True, True, True)),
]


def step_keys(config_path: Path, workspace: Workspace, *overrides: str) -> tuple[str, str, str]:
    config = load_config(config_path, list(overrides))
    dataset_id = dataset_identity(config, workspace).dataset_id
    run = run_key_for(config, workspace, dataset_id)
    return dataset_id, run, eval_key(f"run-{run[:8]}", config, dataset_id)


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A config folder with its own copy of the model under `./model` and data under `./rows.jsonl`."""
    folder = tmp_path / "project"
    shutil.copytree(tiny_model_dir, folder / "model")
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(20)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {"model": {"base": "./model"}, "data": {"sources": [{"path": "./rows.jsonl"}]}}
    (folder / "loop.yaml").write_text(yaml.safe_dump(config))
    return folder / "loop.yaml"


@pytest.mark.parametrize(("override", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_which_change_invalidates_which_step(project: Path, tmp_path: Path, override: str, expected: tuple) -> None:
    workspace = Workspace(tmp_path / "ws")
    before = step_keys(project, workspace)
    after = step_keys(project, workspace, override)
    assert tuple(a != b for a, b in zip(before, after, strict=True)) == expected


def test_answer_parsing_names_the_run_when_training_scores_answers(project: Path, tmp_path: Path) -> None:
    """With train.eval_generate, eval.labels and eval.answer_regex score the answers that choose the kept checkpoint."""
    workspace = Workspace(tmp_path / "ws")
    scoring = "train.eval_generate={rows: 4, metrics: [accuracy]}"
    before = step_keys(project, workspace, scoring)
    assert step_keys(project, workspace, scoring, "eval.labels=[good, bad]")[1] != before[1]
    assert step_keys(project, workspace, scoring, "eval.answer_regex='Answer: (.*)'")[1] != before[1]


def test_other_keys(project: Path, tmp_path: Path) -> None:
    """The sweep study follows training (not eval); a multi-node job's derived run id follows the run key and the
    address the nodes meet at; a converted GGUF is named by the file's path, size and modification time."""
    from tuneloop.keys import gguf_cache_name, job_run_id, sweep_study

    config = load_config(project)
    assert sweep_study(config, "w") == sweep_study(load_config(project, ["eval.limit=3"]), "w")
    assert sweep_study(config, "w") != sweep_study(load_config(project, ["train.learning_rate=0.1"]), "w")
    assert sweep_study(config, "w") != sweep_study(config, "other weights")
    assert job_run_id("p", "key", "10.0.0.1:29500") == job_run_id("p", "key", "10.0.0.1:29500")
    assert job_run_id("p", "key", "10.0.0.1:29500") != job_run_id("p", "key", "10.0.0.2:29500")
    assert job_run_id("p", "key", "10.0.0.1:29500") != job_run_id("p", "other key", "10.0.0.1:29500")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF v1")
    before = gguf_cache_name(gguf)
    gguf.write_bytes(b"GGUF v2, new weights")
    assert gguf_cache_name(gguf) != before


def test_new_base_weights_at_the_same_path_retrain(project: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    workspace = Workspace(tmp_path / "ws")
    dataset, run, _ = step_keys(project, workspace)
    weights = project.parent / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({name: tensor * 1.01 for name, tensor in tensors.items()}, str(weights), metadata={"format": "pt"})
    new_dataset, new_run, _ = step_keys(project, workspace)
    assert new_dataset == dataset  # same tokenizer: the prepared data is still right
    assert new_run != run  # different weights: a finished run must not be reused


def test_relative_base_paths_resolve_against_each_config_folder(project: Path, tmp_path: Path) -> None:
    """Two configs in different folders that both say `./model` name different models, so different runs."""
    workspace = Workspace(tmp_path / "ws")
    other = tmp_path / "other-project"
    shutil.copytree(project.parent, other)
    from safetensors.torch import load_file, save_file

    weights = other / "model" / "model.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    assert step_keys(project, workspace)[1] != step_keys(other / "loop.yaml", workspace)[1]
    # ... and the same weights in another folder are the same model: moving a project keeps its runs.
    same = tmp_path / "moved-project"
    shutil.copytree(project.parent, same)
    assert step_keys(project, workspace) == step_keys(same / "loop.yaml", workspace)
