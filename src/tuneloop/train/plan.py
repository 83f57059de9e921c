"""`tuneloop train --plan`: what a (multi-node) run will do, before it does it — the strategy, each rank's memory,
whether that fits here, and the command every node runs. The answer to "will this 70B job OOM in its third hour?"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneloop.config import LoopConfig
from tuneloop.device import has_gpu, memory_per_process_mb, resolve_precision
from tuneloop.errors import ConfigError
from tuneloop.models import configured_base
from tuneloop.train.launch import DEFAULT_MASTER_PORT, Topology, node_command, shell_join
from tuneloop.train.memory import fits
from tuneloop.train.recipe import estimate_for
from tuneloop.train.strategies import check_strategy, deepspeed_config
from tuneloop.workspace import Workspace


def plan_training(
    config: LoopConfig, workspace: Workspace, topology: Topology, config_file: Path, overrides: list[str]
) -> dict[str, Any]:
    settings = config.train
    strategy = settings.distributed.strategy
    precision = resolve_precision(settings.precision)
    gpu = has_gpu()
    try:
        notes = check_strategy(settings, topology.world_size, gpu)
        problem = None
    except ConfigError as error:
        notes, problem = [], f"{error.message} ({error.hint})" if error.hint else error.message
    base = configured_base(config, workspace)
    estimate = estimate_for(config, base, None, precision.name, topology.world_size)
    here_mb = memory_per_process_mb(topology.nproc_per_node)
    master = topology.master_addr if topology.rdzv_endpoint is None else None
    commands = [
        shell_join(
            node_command(
                str(config_file),
                nproc=str(topology.nproc_per_node),
                nnodes=str(topology.nnodes),
                node_rank=None if topology.rdzv_endpoint else str(node),
                master_addr=master,
                master_port=str(topology.master_port or DEFAULT_MASTER_PORT),
                rdzv_endpoint=topology.rdzv_endpoint,
                overrides=overrides,
                max_restarts=topology.max_restarts,
            )
        )
        for node in range(topology.nnodes if topology.rdzv_endpoint is None else 1)
    ]
    return {
        "strategy": strategy,
        "method": settings.method,
        "precision": precision.name,
        "world_size": topology.world_size,
        "nodes": topology.nnodes,
        "processes_per_node": topology.nproc_per_node,
        "cpu_offload": settings.distributed.cpu_offload,
        "per_rank_mb": {
            "weights": round(estimate.weights_mb),
            "optimizer_and_gradients": round(estimate.trainable_state_mb),
            "activations": round(estimate.activations_mb),
            "overhead": round(estimate.overhead_mb),
            "total": round(estimate.total_mb),
            "offloaded_to_host": round(estimate.offloaded_mb),
        },
        "available_here_per_rank_mb": round(here_mb),
        "fits_here": fits(estimate, here_mb, host_offload=not gpu),
        "device": "gpu" if gpu else "cpu",
        "notes": notes,
        "problem": problem,
        "deepspeed_config": deepspeed_config(settings.distributed, precision.name)
        if strategy.startswith("deep")
        else None,
        "commands": commands,
    }
