"""`tuneloop train --sweep N`: Optuna trials over `train.sweep.space`, pruned on validation loss.

Each trial is an ordinary run (its own run folder and MLflow run) of the config with the sampled values. The study
lives in the workspace (`sweeps.db`), so a sweep can be extended later by running it again; the best trial is
marked in the results table, in `sweeps/<study>.json`, and with the MLflow tag `tuneloop.sweep_best=true`.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

from tuneloop.artifacts._json import write_json
from tuneloop.artifacts.training import RunRecord
from tuneloop.config import LoopConfig
from tuneloop.config_file import apply_override, validate_config
from tuneloop.errors import ConfigError
from tuneloop.keys import fingerprint, new_run_id, sweep_study
from tuneloop.models import base_weights_fingerprint, configured_base
from tuneloop.train.recipe import train_model
from tuneloop.workspace import Workspace


class OptunaPruningCallback(TrainerCallback):
    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.reported: set[int] = set()

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        import optuna

        if not metrics or "eval_loss" not in metrics or state.global_step in self.reported:
            return  # the final evaluation after training repeats the last step
        self.reported.add(state.global_step)
        self.trial.report(metrics["eval_loss"], step=state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step} (eval_loss {metrics['eval_loss']:.4f})")


def trial_config(config: LoopConfig, values: dict[str, Any]) -> LoopConfig:
    raw = config.model_dump(mode="json")
    for key, value in values.items():
        apply_override(raw, f"train.{key}={json.dumps(value)}")
    updated = validate_config(raw, source=f"sweep values {values}")
    updated._config_dir = config._config_dir
    return updated


def run_sweep(config: LoopConfig, workspace: Workspace, trials: int, console: Console | None = None) -> dict[str, Any]:
    import optuna

    console = console or Console(stderr=True)
    space = config.train.sweep.space
    if not space:
        raise ConfigError(
            "--sweep needs a search space in train.sweep.space",
            hint="e.g. train: {sweep: {space: {learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}, "
            "lora.r: {choices: [8, 16]}}}}",
        )
    middle = {key: (spec.choices[0] if spec.choices else spec.low) for key, spec in space.items()}
    trial_config(config, middle)  # every searched key must be a valid train key: fail before the first trial
    study_name = sweep_study(
        config, base_weights_fingerprint(configured_base(config, workspace), workspace.content_hashes)
    )
    workspace.ensure(workspace.sweeps)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if config.train.sweep.prune else optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=study_name,
        storage=f"sqlite:///{workspace.sweeps_db}",
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.train.seed),
        pruner=pruner,
    )

    def objective(trial: optuna.Trial) -> float:
        values: dict[str, Any] = {}
        for key, spec in space.items():
            if spec.choices is not None:
                values[key] = trial.suggest_categorical(key, spec.choices)
            elif spec.integer:
                values[key] = trial.suggest_int(key, int(spec.low or 0), int(spec.high or 0), log=spec.log)
            else:
                values[key] = trial.suggest_float(key, float(spec.low or 0), float(spec.high or 0), log=spec.log)
        console.print(f"[bold]trial {trial.number}[/]: {values}")
        run_id = new_run_id(config.project.name, fingerprint(study_name, trial.number))
        trial.set_user_attr("run_id", run_id)
        try:
            result = train_model(
                trial_config(config, values),
                workspace,
                run_id=run_id,
                callbacks=[OptunaPruningCallback(trial)],
                console=console,
            )
        except optuna.TrialPruned:
            _label_pruned(workspace, run_id, config)
            raise
        trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
        return result.eval_loss if result.eval_loss is not None else float(result.train_loss or "inf")

    study.optimize(objective, n_trials=trials, catch=())
    finished = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if finished else None
    outcome = {
        "study": study_name,
        "storage": str(workspace.sweeps_db),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else None,
        "best_run_id": best.user_attrs.get("run_id") if best else None,
        "trials": [
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value,
                "params": trial.params,
                "run_id": trial.user_attrs.get("run_id"),
                "best": best is not None and trial.number == best.number,
            }
            for trial in study.trials
        ],
    }
    write_json(workspace.sweep_summary(study_name), outcome)
    if best and best.user_attrs.get("mlflow_run_id") and "mlflow" in config.train.report_to:
        from tuneloop.tracking import Tracker

        tracker = Tracker.open(workspace, config.registry.tracking_uri, config.project.name)
        tracker.set_tags(best.user_attrs["mlflow_run_id"], {"tuneloop.sweep_best": "true"})
    return outcome


def _label_pruned(workspace: Workspace, run_id: str, config: LoopConfig) -> None:
    """The recipe marks any interrupted run `failed`; a trial Optuna pruned is `pruned` (KILLED in MLflow)."""
    paths = workspace.run(run_id)
    if not paths.record.exists():
        return
    record = RunRecord.load(paths.record)
    record.status = "pruned"
    record.save(paths.record)
    if record.mlflow_run_id and "mlflow" in config.train.report_to:
        from tuneloop.tracking import Tracker

        Tracker.open(workspace, config.registry.tracking_uri, config.project.name).finish_run(
            record.mlflow_run_id, status="KILLED"
        )
