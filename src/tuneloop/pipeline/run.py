"""`tuneloop run`: prepare -> train -> eval (vs base) -> register -> promote, one recipe over the stage functions.

Every step is cached by the fingerprint of its inputs and skipped when they are unchanged: the dataset by its
content fingerprint, training by the run key (train config + base + dataset), evaluation by run + eval config +
dataset (`pipeline.json` in the run folder), registration by the run id (a version tagged with it), promotion by
the champion alias. A crash at any step loses nothing: the next `tuneloop run` skips what finished and resumes
training from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.workspace import Workspace, fingerprint

STEPS = ("prepare", "train", "eval", "register", "promote")
PIPELINE_STATE = "pipeline.json"
# Testing hook: stop with an error right after the named step, as a crash between steps would.
FAIL_AFTER_ENV = "TUNELOOP_FAIL_AFTER"


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
        if os.environ.get(FAIL_AFTER_ENV) == name:
            raise TuneloopError(f"injected failure after step {name} (${FAIL_AFTER_ENV})")

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
        promoted, promoted_now = _promote(registry, config.registry.name, version, evaluation["passed"], console)
        step("promote", not promoted_now, began)
        info = registry.get(f"{config.registry.name}/{version}")
        registry_info = {"name": info.name, "version": info.version, "aliases": info.aliases}
    else:
        console.print("[yellow]registry.name is not set:[/] the run is not registered nor promoted")

    serve_ref = f"{config.registry.name}@champion" if promoted else (training.adapter_path or training.model_path)
    return {
        "dataset_id": prepared.dataset_id,
        "data": prepared.summary(),
        "run_id": training.run_id,
        "training": training.summary(),
        "metrics": evaluation["metrics"],
        "gates": evaluation["gates"],
        "gates_passed": evaluation["passed"],
        "eval_report": evaluation["report"],
        "registry": registry_info,
        "promoted": promoted,
        "steps_skipped": skipped,
        "step_seconds": timings,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "serve_command": f"tuneloop serve -c CONFIG --model {serve_ref}",
    }


def _prepare(config: LoopConfig, workspace: Workspace, console: Console) -> Any:
    from tuneloop.data.prepare import prepare_dataset

    return prepare_dataset(config, workspace, console=console)


def _train(config: LoopConfig, workspace: Workspace, prepared: Any, console: Console) -> tuple[Any, bool]:
    """The finished run with this run key, else a new (or resumed) training run."""
    from tuneloop.train.recipe import describe_failure, load_result, train_model
    from tuneloop.train.runs import find_finished, find_resumable, run_key

    key = run_key(config.section_dump("train"), config.model.base, prepared.dataset_id)
    finished = find_finished(workspace, key)
    if finished is not None:
        return load_result(workspace.run_dir(finished.run_id)), False
    resume = find_resumable(workspace, key) is not None
    try:
        return train_model(config, workspace, resume=resume, console=console, prepared=prepared), True
    except (TuneloopError, KeyboardInterrupt):
        raise
    except Exception as error:  # the checkpoints stay: the next `tuneloop run` resumes
        raise describe_failure(error) from error


def _evaluate(
    config: LoopConfig, workspace: Workspace, run_id: str, dataset_id: str, console: Console
) -> tuple[dict[str, Any], bool]:
    """The run evaluated against the base; cached in the run's pipeline.json by run + eval config + dataset."""
    from tuneloop.evaluate.run import run_evaluation

    run_dir = workspace.run_dir(run_id)
    key = fingerprint(run_id, config.section_dump("eval"), dataset_id)
    state = _read_state(run_dir)
    cached = state.get("eval", {})
    if cached.get("key") == key and Path(cached.get("metrics", "")).exists():
        return json.loads(Path(cached["metrics"]).read_text(encoding="utf-8")), False
    summary = run_evaluation(config, workspace, run_id, "base", console=console)
    state["eval"] = {"key": key, "metrics": str(Path(summary["dir"]) / "metrics.json")}
    _write_state(run_dir, state)
    return summary, True


def _register(registry: Any, name: str, run_id: str) -> tuple[int, bool]:
    """The version already registered from this run, else a new one."""
    from tuneloop.registry.versions import register_run

    if name in registry.names():
        for info in registry.versions(name):
            if info.run_id == run_id:
                return info.version, False
    return register_run(registry, run_id, name).version, True


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


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PIPELINE_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    temporary = run_dir / f".{PIPELINE_STATE}.tmp"
    temporary.write_text(json.dumps(state, indent=2), encoding="utf-8")
    temporary.replace(run_dir / PIPELINE_STATE)
