"""How long a run trains and how often it validates and checkpoints: `train.epochs/eval_every/save_every: auto`
resolved against the train split's size (known only once the data is prepared and packed).

Packing is on by default, so a small dataset gives few optimizer steps per epoch (2,000 short rows pack into ~500
samples: ~125 steps of 4). `epochs: auto` therefore makes the fewest whole passes that reach `auto_min_steps`,
capped at `auto_max_epochs` so a tiny dataset is not memorised; a large one gets one pass. Validation runs five times
in a run (keep-best and early stopping choose among those), a checkpoint at each validation; when
`train.eval_generate.every` is a number, validation runs that often instead (task metrics are computed during
validations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneloop.config import TrainConfig

VALIDATIONS_PER_RUN = 5
SHORTEST_VALIDATION_INTERVAL = 10


@dataclass(frozen=True)
class Schedule:
    epochs: float
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    limited_by_max_steps: bool = False

    def describe(self) -> str:
        if self.limited_by_max_steps:
            passes = f"max_steps; an epoch is {self.steps_per_epoch} steps"
        else:
            passes = f"{self.epochs:g} epoch{'s' if self.epochs != 1 else ''} x {self.steps_per_epoch} steps"
        return f"{self.total_steps} steps ({passes}), validation every {self.eval_every}, checkpoint every {self.save_every}"


def plan_schedule(settings: TrainConfig, train_samples: int, world_size: int = 1) -> Schedule:
    """The run's epochs, optimizer steps and intervals for `train_samples` samples (packed samples when packing)."""
    per_step = settings.batch_size * settings.grad_accum * max(world_size, 1)
    steps_per_epoch = max(math.ceil(train_samples / per_step), 1)
    if settings.epochs == "auto":
        wanted = math.ceil(settings.auto_min_steps / steps_per_epoch)
        epochs: float = float(min(max(wanted, 1), settings.auto_max_epochs))
    else:
        epochs = float(settings.epochs)
    total = settings.max_steps or max(math.ceil(epochs * steps_per_epoch), 1)
    eval_every, save_every = _intervals(settings, total)
    return Schedule(epochs, steps_per_epoch, total, eval_every, save_every, settings.max_steps is not None)


def _intervals(settings: TrainConfig, total: int) -> tuple[int, int]:
    automatic = max(1, min(total, max(SHORTEST_VALIDATION_INTERVAL, math.ceil(total / VALIDATIONS_PER_RUN))))
    eval_every = settings.validation_interval()
    save_every = settings.save_every if isinstance(settings.save_every, int) else None
    if eval_every is None:
        generation = settings.eval_generate.every if settings.eval_generate else None
        # Task metrics are computed during validations: validate whenever they are due.
        eval_every = min(generation, total) if isinstance(generation, int) else automatic
    if save_every is None:
        save_every = eval_every  # keep-best needs a checkpoint at every validation it may pick
    return eval_every, save_every
