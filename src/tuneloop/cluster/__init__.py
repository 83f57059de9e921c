"""Cluster launchers: `tuneloop launch kubeflow|skypilot|slurm` writes a scheduler's job spec that starts the same
`tuneloop train` on every node (`train.launch.node_command`), each node's rank and the rendezvous address taken from
the scheduler's own variables, plus a README that says how to submit it. One module per scheduler renders its files;
`job` holds what they share. Nothing here talks to a cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuneloop.cluster import kubeflow, skypilot, slurm
from tuneloop.cluster.job import (
    ClusterJob,
    LaunchResult,
    LaunchSpec,
    LaunchTarget,
    NodeRequest,
    plan_job,
    write_out,
)

RENDERERS: dict[LaunchTarget, Callable[[ClusterJob], tuple[LaunchSpec, str]]] = {
    "kubeflow": kubeflow.render,
    "skypilot": skypilot.render,
    "slurm": slurm.render,
}


def write_launch(
    target: LaunchTarget,
    config_file: Path,
    request: NodeRequest,
    out: Path,
    overrides: list[str] | None = None,
    force: bool = False,
) -> LaunchResult:
    """Check the request and the config, render the target's spec and README, then write them into `out` with a copy
    of the config. Nothing is written when a check fails."""
    job = plan_job(target, config_file, overrides, request)
    spec, readme = RENDERERS[target](job)
    files = write_out(out, force, job, spec, readme)
    return LaunchResult(
        target=target, out=out, files=files, submit=spec.submit, node_command=spec.node_command, name=job.name
    )


__all__ = ["ClusterJob", "LaunchResult", "LaunchTarget", "NodeRequest", "plan_job", "write_launch"]
