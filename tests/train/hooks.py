"""Test hooks for training (kept out of the shipped package)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class CrashAtStep(TrainerCallback):
    """Raises after a given optimizer step, as a crash mid-run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            raise RuntimeError(f"injected crash after step {state.global_step}")
