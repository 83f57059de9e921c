"""`tuneloop dvc init`: the loop as a DVC pipeline (`dvc.yaml`), so `dvc repro` reruns exactly the stages whose
inputs changed and `dvc push` versions the prepared data.

Stages and what each one's rerun hangs on:

| stage | command | deps | params (the config file's sections) | outs |
|---|---|---|---|---|
| prepare | `tuneloop data prepare` | data source files, a local base model | `model`, `data` | `<workspace>/datasets` (cached: pushed), `tuneloop-steps/prepare.json` |
| train | `tuneloop train` | prepare's outs, a local base model | `model`, `train` | `tuneloop-steps/train.json` |
| eval | `tuneloop eval --model RUN` | train.json, the datasets | `eval` | `tuneloop-steps/eval.json` (a DVC metric) |
| register | `tuneloop registry register RUN` | train.json, eval.json | `registry` | `tuneloop-steps/register.json` |

Fixed paths for keyed folders: the workspace names datasets and runs by their keys, which DVC cannot follow, so
every stage writes its `--json` result (dataset id, run id, metrics, version) to a fixed step file
(`tuneloop-steps/<stage>.json`, `cache: false`: small, committed to git, diffable) and later stages read the run id
from it (`tuneloop dvc value`). The workspace's whole `datasets/` folder is prepare's cached out: DVC empties it
before prepare runs, so it holds exactly the current dataset, and `dvc push` / `dvc pull` version it. Runs
(adapters, checkpoints) are not DVC outs: the model registry versions models, and eval writes its report into the
run folder, which DVC would count as a change of a previous stage's out.

The config file is DVC's params file: DVC compares the listed sections' values, not the file, so changing
`train.learning_rate` reruns train, eval and register but not prepare. A section missing from the file when
`dvc.yaml` is written is not tracked: run `tuneloop dvc init --force` after adding one.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneloop.config import LoopConfig
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.workspace import Workspace

DVC_FILE = "dvc.yaml"
STEPS_DIR = "tuneloop-steps"
MAKE_STEPS_DIR = f"mkdir -p {STEPS_DIR} && "  # a fresh clone has no step files yet, so maybe not their folder
# The config sections each stage's result depends on (DVC params); a stage reruns when one of them changes.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("model", "data"),
    "train": ("model", "train"),
    "eval": ("eval",),
    "register": ("registry",),
}


@dataclass
class DvcPipeline:
    dvc_file: Path
    stages: dict[str, dict[str, Any]]
    steps_dir: Path
    workspace: Path

    def summary(self) -> dict[str, Any]:
        return {
            "dvc_file": str(self.dvc_file),
            "steps_dir": str(self.steps_dir),
            "workspace": str(self.workspace),
            "stages": {
                name: {
                    "cmd": stage["cmd"],
                    "deps": stage.get("deps", []),
                    "params": [key for entry in stage.get("params", []) for keys in entry.values() for key in keys],
                    "outs": [_path_of(out) for out in stage.get("outs", []) + stage.get("metrics", [])],
                }
                for name, stage in self.stages.items()
            },
        }


def write_dvc_pipeline(
    config: LoopConfig, config_file: Path, workspace: Workspace, folder: Path, force: bool = False
) -> DvcPipeline:
    """Write `dvc.yaml` in `folder` (inside a git + DVC repository) for `config_file`."""
    folder = folder.resolve()
    repo = _repository_root(folder)
    dvc_file = folder / DVC_FILE
    if dvc_file.exists() and not force:
        raise TuneloopError(f"{dvc_file} exists", hint="pass --force to replace it (its stages are rewritten)")
    config_path = _inside(config_file.resolve(), repo, "the config file (DVC reads its params from it)")
    workspace_path = _inside(workspace.root, repo, "the workspace (DVC tracks its datasets folder)")
    sections = _sections_in(config_path)
    stages = _stages(config, _relative(config_path, folder), _relative(workspace_path, folder), sections, folder)
    (folder / STEPS_DIR).mkdir(exist_ok=True)
    header = (
        "# Written by `tuneloop dvc init`; rerun it with --force after adding a config section.\n"
        f"# Step results (fixed paths for the workspace's keyed folders) are in {STEPS_DIR}/.\n"
    )
    dvc_file.write_text(header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=10_000), encoding="utf-8")
    return DvcPipeline(dvc_file, stages, folder / STEPS_DIR, workspace_path)


def read_value(file: Path, key: str) -> Any:
    """A dotted key's value in a JSON or YAML file (what `tuneloop dvc value` prints for stage commands)."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuneloopError(f"{file} does not exist", hint="run the stage that writes it first (dvc repro)") from None
    try:
        value: Any = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise TuneloopError(f"{file} is not JSON/YAML: {error}") from None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TuneloopError(f"{file} has no {key!r}", hint="check the stage that wrote it")
        value = value[part]
    if value is None:
        raise TuneloopError(f"{file}: {key!r} is empty", hint=f"set {key} in {file.name}")
    return value


def _stages(
    config: LoopConfig, config_ref: str, workspace_ref: str, sections: set[str], folder: Path
) -> dict[str, dict[str, Any]]:
    common = f"-c {shlex.quote(config_ref)} --workspace {shlex.quote(workspace_ref)}"
    step = {name: f"{STEPS_DIR}/{name}.json" for name in STAGE_SECTIONS}
    datasets = f"{workspace_ref}/{Workspace(Path(workspace_ref)).datasets.name}"
    run_id = f'"$(tuneloop dvc value {step["train"]} run_id)"'
    model = _model_dependency(config, folder)

    def params(stage: str) -> list[dict[str, list[str]]]:
        present = [section for section in STAGE_SECTIONS[stage] if section in sections]
        return [{config_ref: present}] if present else []

    stages: dict[str, dict[str, Any]] = {
        "prepare": {
            "cmd": f"{MAKE_STEPS_DIR}tuneloop data prepare {common} --json > {step['prepare']}",
            "deps": _source_dependencies(config, folder) + model,
            "params": params("prepare"),
            "outs": [{datasets: {"cache": True}}, {step["prepare"]: {"cache": False}}],
        },
        "train": {
            # Registration is the register stage's job (after eval, so the version's lineage has the evaluation).
            "cmd": f"{MAKE_STEPS_DIR}tuneloop train {common} --set registry.name=null --json > {step['train']}",
            "deps": [step["prepare"], datasets, *model],
            "params": params("train"),
            "outs": [{step["train"]: {"cache": False}}],
        },
        "eval": {
            "cmd": f"{MAKE_STEPS_DIR}tuneloop eval {common} --model {run_id} --json > {step['eval']}",
            "deps": [step["train"], datasets],
            "params": params("eval"),
            "metrics": [{step["eval"]: {"cache": False}}],
        },
    }
    if config.registry.name:
        name = f'"$(tuneloop dvc value {shlex.quote(config_ref)} registry.name)"'
        stages["register"] = {
            "cmd": f"{MAKE_STEPS_DIR}tuneloop registry register {run_id} --name {name} {common} "
            f"--json > {step['register']}",
            "deps": [step["train"], step["eval"]],
            "params": params("register"),
            "outs": [{step["register"]: {"cache": False}}],
        }
    for stage in stages.values():
        if not stage["params"]:
            del stage["params"]
    return stages


def _source_dependencies(config: LoopConfig, folder: Path) -> list[str]:
    """The data source files (built-in sources are generated: their identity is in the `data` params)."""
    from tuneloop.data.sources import BUILTIN_PREFIX

    paths = []
    for source in config.data.sources:
        if source.path.startswith(BUILTIN_PREFIX):
            continue
        path = config.resolve_path(source.path)
        if not path.exists():
            raise ConfigError(f"data source not found: {path}", hint="fix data.sources[].path before `dvc init`")
        paths.append(_relative(path, folder))
    return paths


def _model_dependency(config: LoopConfig, folder: Path) -> list[str]:
    """A local base model folder or file (new weights at the same path retrain); hub names and bundled aliases are
    identified by the `model` params."""
    spec = Path(config.base_model_spec())
    return [_relative(spec, folder)] if spec.is_absolute() and spec.exists() else []


def _sections_in(config_path: Path) -> set[str]:
    loaded = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    return set(loaded) if isinstance(loaded, dict) else set()


def _repository_root(folder: Path) -> Path:
    """The git repository holding `folder`, which must also be a DVC repository."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            if not any(
                (above / ".dvc").is_dir() for above in (folder, *folder.parents) if above.is_relative_to(candidate)
            ):
                raise TuneloopError(
                    f"{candidate} is a git repository but not a DVC repository", hint=f"run `dvc init` in {candidate}"
                )
            return candidate
    raise TuneloopError(
        f"{folder} is not inside a git repository",
        hint="DVC pipelines live in git: `git init && dvc init`, then `tuneloop dvc init -c CONFIG`",
    )


def _inside(path: Path, repo: Path, what: str) -> Path:
    if not path.is_relative_to(repo):
        raise TuneloopError(
            f"{what} is outside the repository {repo}: {path}",
            hint="keep it inside the repository (e.g. --workspace .tuneloop)",
        )
    return path


def _relative(path: Path, folder: Path) -> str:
    """`path` as dvc.yaml writes it: relative to its folder when inside it (portable), else absolute."""
    path = path.resolve()
    return os.path.relpath(path, folder) if path.is_relative_to(folder) else str(path)


def _path_of(out: str | dict[str, Any]) -> str:
    return out if isinstance(out, str) else next(iter(out))
