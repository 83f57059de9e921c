"""`tuneloop run`: prepare -> train -> eval (vs base) -> register -> promote, one recipe over the stage functions.

Every step is cached by its key (`tuneloop.keys`) and skipped when it is unchanged: the dataset by its content
fingerprint, training by the run key (train config + base weights + dataset), evaluation by run + eval config +
dataset (the run's `pipeline.json`), registration by the run id (a version tagged with it), promotion by the
champion alias. A crash at any step loses nothing: the next `tuneloop run` skips what finished and resumes
training from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.artifacts._json import write_json
from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.training import TrainResult
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.keys import eval_key
from tuneloop.workspace import EvalPaths, RunPaths, Workspace

STEPS = ("prepare", "train", "eval", "register", "promote")


def run_pipeline(config: LoopConfig, workspace: Workspace, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    skipped: list[str] = []
    timings: dict[str, float] = {}

    def step(name: str, cached: bool, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 2)
        if cached:
            skipped.append(name)
        console.print(f"[bold]{name}[/]: {'cached, skipped' if cached else 'done'} ({timings[name]:.1f} s)")

    began = time.perf_counter()
    prepared = _prepare(config, workspace, console)
    step("prepare", prepared.cache_hit, began)

    began = time.perf_counter()
    training, trained_now = _train(config, workspace, prepared, console)
    step("train", not trained_now, began)

    began = time.perf_counter()
    evaluation, evaluated_now = _evaluate(config, workspace, training.run_id, prepared.dataset_id, console)
    step("eval", not evaluated_now, began)

    registry_info: dict[str, Any] | None = None
    promoted = False
    if config.registry.name:
        from tuneloop.registry.store import Registry

        registry = Registry(config, workspace)
        began = time.perf_counter()
        version, registered_now = _register(registry, config.registry.name, training.run_id)
        step("register", not registered_now, began)

        began = time.perf_counter()
        promoted, promoted_now = _promote(registry, config.registry.name, version, evaluation.passed, console)
        step("promote", not promoted_now, began)
        info = registry.get(f"{config.registry.name}/{version}")
        registry_info = {"name": info.name, "version": info.version, "aliases": info.aliases}
    else:
        console.print("[yellow]registry.name is not set:[/] the run is not registered nor promoted")

    serve_ref = f"{config.registry.name}@champion" if promoted else str(training.output)
    return {
        "dataset_id": prepared.dataset_id,
        "data": prepared.summary(),
        "run_id": training.run_id,
        "training": training.summary(),
        "metrics": evaluation.metrics,
        "gates": evaluation.gates,
        "gates_passed": evaluation.passed,
        "eval_report": evaluation.report,
        "registry": registry_info,
        "promoted": promoted,
        "steps_skipped": skipped,
        "step_seconds": timings,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "serve_command": f"tuneloop serve -c CONFIG --model {serve_ref}",
    }


def _prepare(config: LoopConfig, workspace: Workspace, console: Console) -> PreparedDataset:
    from tuneloop.data.prepare import prepare_dataset

    return prepare_dataset(config, workspace, console=console)


def _train(
    config: LoopConfig, workspace: Workspace, prepared: PreparedDataset, console: Console
) -> tuple[TrainResult, bool]:
    """The finished run with this run key, else a new (or resumed) training run."""
    from tuneloop.train.recipe import describe_failure, train_model
    from tuneloop.train.runs import find_finished, find_resumable, run_key_for

    key = run_key_for(config, workspace, prepared.dataset_id)
    finished = find_finished(workspace, key)
    if finished is not None:
        return finished, False
    resume = find_resumable(workspace, key) is not None
    try:
        return train_model(config, workspace, resume=resume, console=console, prepared=prepared), True
    except (TuneloopError, KeyboardInterrupt):
        raise
    except Exception as error:  # the checkpoints stay: the next `tuneloop run` resumes
        raise describe_failure(error) from error


def _evaluate(
    config: LoopConfig, workspace: Workspace, run_id: str, dataset_id: str, console: Console
) -> tuple[EvalReport, bool]:
    """The run evaluated against the base; cached in the run's pipeline.json by `keys.eval_key`."""
    from tuneloop.evaluate.run import run_evaluation

    run = workspace.run(run_id)
    key = eval_key(run_id, config, dataset_id)
    state = _read_state(run)
    cached = state.get("eval", {})
    if cached.get("key") == key and Path(cached.get("metrics", "")).exists():
        return EvalReport.load(Path(cached["metrics"])), False
    from tuneloop.serve.offline import local_eval_engine

    engine = local_eval_engine(config, workspace, console)
    report = run_evaluation(config, workspace, run_id, "base", console=console, local_engine=engine)
    state["eval"] = {"key": key, "metrics": str(EvalPaths(Path(report.dir)).metrics)}
    write_json(run.pipeline_state, state)
    return report, True


def _register(registry: Any, name: str, run_id: str) -> tuple[int, bool]:
    """The version already registered from this run, else a new one."""
    from tuneloop.registry.versions import ensure_registered

    info, registered_now = ensure_registered(registry, name, run_id)
    return info.version, registered_now


def _promote(registry: Any, name: str, version: int, passed: bool, console: Console) -> tuple[bool, bool]:
    """(is champion, whether the step ran): promote when the gates passed and it is not the champion yet; it is
    cached only when the version already is the champion."""
    from tuneloop.registry.versions import promote

    if "champion" in registry.get(f"{name}/{version}").aliases:
        return True, False
    if not passed:
        console.print(f"[yellow]{name}/{version} failed its gates:[/] not promoted (the champion is unchanged)")
        return False, True
    promote(registry, name, version, force=False, console=console)
    return True, True


def _read_state(run: RunPaths) -> dict[str, Any]:
    return json.loads(run.pipeline_state.read_text(encoding="utf-8")) if run.pipeline_state.exists() else {}
