"""lm-evaluation-harness bridge: `tuneloop eval --harness TASKS` runs lm-eval's `hf` model type on the model (base
weights + `peft=` adapter). There is no hub here, so tasks must come from local YAML files (`--harness-include DIR`,
with `dataset_path: json` and local data files); metrics that lm-eval loads through `evaluate` need the hub, while
acc, acc_norm, perplexity and exact_match do not. Install it with `pip install "lm_eval[hf]"`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.errors import TuneloopError
from tuneloop.registry.refs import ModelSpec


def run_harness(
    spec: ModelSpec, tasks: list[str], include: Path | None, limit: int | None, console: Console
) -> dict[str, float]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise TuneloopError("--harness needs lm-evaluation-harness", hint='pip install "lm_eval[hf]"') from exc
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_args = f"pretrained={spec.weights},dtype=float32"
    if spec.adapter is not None:
        model_args += f",peft={spec.adapter}"
    manager = TaskManager(include_path=str(include) if include else None)
    console.print(f"[{spec.label}] lm-eval tasks: {', '.join(tasks)}")
    results: dict[str, Any] = simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        batch_size=8,
        device="cpu",
        log_samples=False,
    )
    metrics: dict[str, float] = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            if isinstance(value, int | float) and not name.endswith("stderr,none") and name != "alias":
                metrics[f"harness.{task}.{name.replace(',none', '')}"] = float(value)
    return metrics
