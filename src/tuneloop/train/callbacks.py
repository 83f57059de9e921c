"""Trainer callbacks: a rich progress bar (loss, tokens/s, ETA), throughput/memory metrics in the logs, and MLflow
logging. (Optuna pruning is the sweep's own callback, in sweep.py.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from tuneloop.device import peak_memory_mb
from tuneloop.train.inputs import TokenCounter


class ThroughputCallback(TrainerCallback):
    """Training tokens/s and peak memory, added to every log entry (and so to every tracker).

    The collator counts every batch it builds, evaluation batches too; those are taken out by noting the count at
    each step's end and at each evaluation's end (evaluation runs between the two). The time is training time only:
    what passes between a step's end and the next step's start (validation, checkpoints, logging) is left out, and
    so is the first step, which compiles (`train.compile`) and warms up; its time is `first_step_seconds`."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.started = 0.0
        self.start_tokens = 0
        self.mark = 0
        self.eval_tokens = 0
        self.train_seconds = 0.0
        self.paused_seconds = 0.0
        self.paused_since: float | None = None
        self.first_step_seconds: float | None = None
        self.first_step_tokens = 0
        self.final_tokens: int | None = None
        self.local_tokens = 0  # this process's share, set at the end

    def train_tokens(self) -> int:
        if self.final_tokens is not None:
            return self.final_tokens
        return self.counter.tokens - self.start_tokens - self.eval_tokens

    def training_seconds(self) -> float:
        if self.train_seconds:
            return self.train_seconds
        now = time.perf_counter()
        pause = now - self.paused_since if self.paused_since is not None else 0.0
        return now - self.started - self.paused_seconds - pause

    def tokens_per_second(self) -> float:
        seconds, tokens = self.training_seconds(), self.train_tokens()
        if self.first_step_seconds is not None and seconds - self.first_step_seconds > 1e-3:
            seconds -= self.first_step_seconds
            tokens -= self.first_step_tokens
        return tokens / max(seconds, 1e-9)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.start_tokens = self.mark = self.counter.tokens

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.paused_since is not None:
            self.paused_seconds += time.perf_counter() - self.paused_since
            self.paused_since = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = self.counter.tokens
        if self.first_step_seconds is None:
            self.first_step_seconds = self.training_seconds()
            self.first_step_tokens = self.train_tokens()
        self.paused_since = time.perf_counter()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.final_tokens is None:
            self.eval_tokens += self.counter.tokens - self.mark
            self.mark = self.counter.tokens

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        logs["tokens_per_second"] = round(self.tokens_per_second(), 1)
        logs["peak_memory_mb"] = round(peak_memory_mb(), 1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_seconds = self.training_seconds()
        self.local_tokens = self.train_tokens()
        self.final_tokens = _sum_over_processes(self.local_tokens)
        self.first_step_tokens = _sum_over_processes(self.first_step_tokens)


def _sum_over_processes(value: int) -> int:
    """Data-parallel workers each count their own batches; the run's throughput is the sum."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    import torch

    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


class RichProgressCallback(TrainerCallback):
    """One progress bar for the run (step, loss, tokens/s of training time, elapsed and ETA) and one for each
    validation pass while it runs."""

    def __init__(self, console: Console, throughput: ThroughputCallback) -> None:
        self.console = console
        self.throughput = throughput
        self.progress: Progress | None = None
        self.task: Any = None
        self.validation: Any = None
        self.loss = float("nan")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", tps="-"
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        self.progress.update(
            self.task,
            completed=state.global_step,
            loss=f"{self.loss:.4f}",
            tps=f"{self.throughput.tokens_per_second():,.0f}",
        )

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        if self.validation is None:
            loader = kwargs.get("eval_dataloader")
            total = len(loader) if loader is not None and hasattr(loader, "__len__") else None
            self.validation = self.progress.add_task("validate", total=total, loss="", tps="")
        self.progress.advance(self.validation)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None and self.validation is not None:
            self.progress.remove_task(self.validation)
        self.validation = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = logs["loss"]
            if self.progress is not None and not self.console.is_terminal:
                # Not a terminal (CI, a log file): the live bar does not redraw, so write a line per logging step.
                self.console.print(
                    f"step {state.global_step}/{state.max_steps}: loss {self.loss:.4f}, "
                    f"{self.throughput.tokens_per_second():,.0f} tok/s, "
                    f"elapsed {self.progress.tasks[0].elapsed or 0:.0f} s, "
                    f"eta {self.progress.tasks[0].time_remaining or 0:.0f} s"
                )
        if self.progress is not None and logs and "eval_loss" in logs:
            self.progress.console.print(f"step {state.global_step}: {describe_validation(logs)}")

    @contextmanager
    def generation_bar(self, total: int) -> Iterator[Callable[[int], None]]:
        """A bar for a task-metrics generation pass (`train.eval_generate`); yields the function advancing it."""
        if self.progress is None:
            yield lambda _done: None
            return
        progress = self.progress
        task = progress.add_task("generate", total=total, loss="", tps="")
        try:
            yield lambda done: progress.advance(task, done)
        finally:
            progress.remove_task(task)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def describe_validation(logs: dict[str, float]) -> str:
    """`eval_loss 1.2345, eval_exact_match 0.8125 (generation 4.2 s)`: the validation's metrics on one line."""
    shown = [
        f"{name} {value:.4f}"
        for name, value in logs.items()
        if name.startswith("eval_") and name not in _TIMING_KEYS and isinstance(value, int | float)
    ]
    seconds = logs.get("eval_generate_seconds")
    return ", ".join(shown) + (f" (generation {seconds:.1f} s)" if seconds is not None else "")


# Timings the Trainer (and eval_generate) add to a validation's log entry: logged, not shown as metrics.
_TIMING_KEYS = {
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_model_preparation_time",
    "eval_generate_seconds",
}


class MlflowCallback(TrainerCallback):
    """Logs every Trainer log entry into the run's MLflow run, from the main process only."""

    def __init__(self, tracker: Any, mlflow_run_id: str, system_metrics: bool = False, resumed: bool = False) -> None:
        self.tracker = tracker
        self.run_id = mlflow_run_id
        self.system_metrics = system_metrics  # train.system_metrics: MLflow's CPU/memory/GPU sampling thread
        self.resumed = resumed
        self.monitor: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.system_metrics and self.monitor is None and state.is_world_process_zero:
            self.monitor = self.tracker.start_system_metrics(self.run_id, resume=self.resumed)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        numbers = {k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.tracker.log_metrics(self.run_id, numbers, step=state.global_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=step)

    def finish(self, artifacts: list[Path] | None = None, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self.tracker.log_artifacts(self.run_id, artifacts or [])
        self.tracker.finish_run(self.run_id, status=status)
