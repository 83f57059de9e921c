"""One process of a multi-process run: `python -m tuneloop.train.worker -c CONFIG --run-id ID --workspace DIR`.

`tuneloop train --nproc N` (launch.py) prepares the data, converts the base model and settles the run id on each
node, then has torchrun start N of these; each runs the same recipe under the configured strategy (DDP, FSDP2 or
DeepSpeed). Only global rank 0 writes the run record, MLflow and the summary; the launcher prints the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tuneloop.config_file import load_config
from tuneloop.errors import TuneloopError
from tuneloop.train.recipe import describe_failure, local_rank, train_model
from tuneloop.workspace import Workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneloop.train.worker", description=__doc__)
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    _use_own_gpu()
    try:
        config = load_config(args.config, args.overrides)
        try:
            train_model(config, Workspace(args.workspace), resume=args.resume, run_id=args.run_id, console=console)
        except (TuneloopError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise describe_failure(error) from error
    except TuneloopError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    return 0


def _use_own_gpu() -> None:
    """Each worker on its own GPU (torchrun's LOCAL_RANK) before anything touches CUDA: otherwise every worker
    creates a context on GPU 0 while checking precision and memory."""
    from tuneloop.device import has_gpu

    if has_gpu():
        import torch

        torch.cuda.set_device(local_rank())


if __name__ == "__main__":
    sys.exit(main())
