"""`tuneloop train --nproc N [--nnodes M --node-rank K --master-addr HOST --master-port P | --rdzv-endpoint HOST:PORT]`:
multi-process and multi-node training through PyTorch's own launcher, torchrun (`torch.distributed.run`).

On each node the parent prepares the data and converts the base model once (so the workers only hit caches), settles
the run id (the same on every node), then has torchrun start N workers (`python -m tuneloop.train.worker`) that run
the same recipe. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; Transformers' Trainer (through Accelerate) runs DDP over
them, or DeepSpeed, and `train.distributed: fsdp` shards with FSDP2 (train/fsdp.py). Every worker's output lines
carry its rank (`[default0]:` ... from torchrun's `--tee`); only global rank 0 writes the run record, MLflow and the
summary. `node_command` is what cluster launchers (tuneloop.cluster) run on each node.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.config import LoopConfig
from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.device import has_gpu
from tuneloop.errors import TuneloopError
from tuneloop.keys import job_run_id, new_run_id
from tuneloop.models import configured_base, materialize
from tuneloop.net import free_port
from tuneloop.train.runs import find_resumable, run_key_for
from tuneloop.train.strategies import check_strategy
from tuneloop.workspace import Workspace

# torchrun's own default, which cluster specs and `--plan` write when no port is given.
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Topology:
    """Where this node's processes sit in the job (torchrun's own options, same names)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (single node only)
    rdzv_endpoint: str | None = None  # HOST:PORT: c10d rendezvous (elastic; nodes need no rank)
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def meeting_host(self) -> str:
        """The host the nodes meet at: node 0's address, or the rendezvous endpoint's."""
        return self.rdzv_endpoint.rsplit(":", 1)[0] if self.rdzv_endpoint else self.master_addr

    def check(self) -> None:
        """Refuse what torchrun would only fail on later (or hang on)."""
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise TuneloopError("--nproc and --nnodes must be at least 1")
        if self.rdzv_endpoint is None and not 0 <= self.node_rank < self.nnodes:
            raise TuneloopError(f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1}")
        if self.multi_node and self.rdzv_endpoint is None and self.master_port is None:
            raise TuneloopError(
                "a multi-node job needs the address every node meets at",
                hint="pass --master-addr HOST --master-port PORT (the same on every node), or --rdzv-endpoint HOST:PORT",
            )


def torchrun_options(topology: Topology, run_id: str, timeout_seconds: int) -> list[str]:
    """torchrun's options for this node. The rendezvous waits at most `timeout_seconds` for the other nodes."""
    options = ["--nproc-per-node", str(topology.nproc_per_node), "--nnodes", str(topology.nnodes)]
    if topology.rdzv_endpoint is not None:
        host = topology.meeting_host
        # torch decides who hosts the rendezvous store, and which address the workers are given, from the hostname,
        # which often resolves to 127.0.0.1: say both explicitly instead.
        hosting = int(is_local_address(host))
        options += ["--rdzv-backend", "c10d", "--rdzv-endpoint", topology.rdzv_endpoint, "--rdzv-id", run_id]
        options += ["--rdzv-conf", f"is_host={hosting},join_timeout={timeout_seconds}"]
        options += ["--local-addr", host if hosting else local_address_towards(host)]
    else:
        port = topology.master_port or free_port()
        options += ["--node-rank", str(topology.node_rank)]
        options += ["--master-addr", topology.master_addr, "--master-port", str(port)]
        options += ["--rdzv-conf", f"timeout={timeout_seconds}"]
    # --tee 3: every line of each worker's stdout/stderr on the console, prefixed with its local rank.
    return [*options, "--max-restarts", str(topology.max_restarts), "--tee", "3"]


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (binding to it succeeds)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((socket.gethostbyname(host), 0))
        return True
    except OSError:
        return False


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (a UDP socket's connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))
        return str(probe.getsockname()[0])


def interface_towards(host: str) -> str | None:
    """The network interface that reaches `host`, for gloo (GLOO_SOCKET_IFNAME): without it gloo binds to whatever
    the hostname resolves to, often loopback, and the other nodes cannot connect."""
    import socket

    import psutil

    address = socket.gethostbyname(host) if is_local_address(host) else local_address_towards(host)
    for name, entries in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in entries):
            return name
    return None


def worker_command(
    topology: Topology, config: LoopConfig, config_file: Path, workspace: Workspace, run_id: str, overrides: list[str]
) -> list[str]:
    timeout = config.train.distributed.timeout_minutes * 60
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_options(topology, run_id, timeout)]
    command += ["-m", "tuneloop.train.worker", "-c", str(config_file), "--run-id", run_id]
    command += ["--workspace", str(workspace.root)]
    for override in overrides:
        command += ["--set", override]
    # Always --resume: the run id is settled, so a worker restarted by torchrun (--max-restarts) continues from the
    # last checkpoint instead of training from step 0 in the same folder; a first start has nothing to resume.
    return [*command, "--resume"]


def node_command(
    config_file: str,
    *,
    nproc: str,
    nnodes: str,
    node_rank: str | None,
    master_addr: str | None,
    master_port: str | None,
    rdzv_endpoint: str | None = None,
    run_id: str | None = None,
    overrides: list[str] | None = None,
    max_restarts: int = 0,
    resume: bool = False,
) -> list[str]:
    """The `tuneloop train` command one node of a cluster job runs. Values may be shell variables (`$NODE_RANK`),
    which the scheduler's script expands; cluster launchers (tuneloop.cluster) build their specs from it. With
    `resume`, a requeued job continues its run (same --run-id) from the last checkpoint instead of starting over;
    a first start has nothing to resume and begins the run."""
    command = ["tuneloop", "train", "-c", config_file, "--nproc", nproc, "--nnodes", nnodes]
    if rdzv_endpoint is not None:
        command += ["--rdzv-endpoint", rdzv_endpoint]
    else:
        command += ["--node-rank", str(node_rank), "--master-addr", str(master_addr), "--master-port", str(master_port)]
    if run_id is not None:
        command += ["--run-id", run_id]
    if max_restarts:
        command += ["--max-restarts", str(max_restarts)]
    for override in overrides or []:
        command += ["--set", override]
    return [*command, "--resume"] if resume else command


def shell_join(command: list[str]) -> str:
    """A command for a shell script, leaving `$VARIABLES` for the shell to expand."""
    return " ".join(part if part.startswith("$") or part.startswith('"$') else shlex.quote(part) for part in command)


def launch_distributed(
    config_file: Path,
    overrides: list[str],
    workspace: Workspace,
    topology: Topology,
    resume: bool,
    run_id: str | None,
    console: Console,
) -> TrainResult | None:
    """Run this node's share of the job. Returns the run's result on the node that holds global rank 0 (None on the
    others: the result is in node 0's workspace)."""
    topology.check()
    config = load_config(config_file, overrides)
    for note in check_strategy(config.train, topology.world_size, has_gpu()):
        console.print(f"[yellow]note:[/] {note}")
    prepared = prepare_dataset(config, workspace, console=console)
    base = configured_base(config, workspace)
    if base.kind != "hub":
        materialize(base)
    run_id = settle_run_id(config, workspace, prepared.dataset_id, topology, resume, run_id)
    command = worker_command(topology, config, config_file, workspace, run_id, overrides)
    console.print(f"launching {topology.nproc_per_node} processes: {shell_join(command)}", highlight=False)
    # OMP_NUM_THREADS: torchrun sets 1 per worker when several share a node, and leaves a lone worker all cores.
    environment = dict(os.environ)
    if topology.multi_node and "GLOO_SOCKET_IFNAME" not in environment and not has_gpu():
        interface = interface_towards(topology.meeting_host)
        if interface is not None:
            environment["GLOO_SOCKET_IFNAME"] = interface
    # Workers report on stderr; stdout stays the parent's (one table, or one JSON object).
    completed = subprocess.run(command, env=environment, check=False, stdout=_stderr_fileno())
    if completed.returncode != 0:
        raise TuneloopError(
            f"distributed training exited with status {completed.returncode} (run {run_id})",
            hint="see the workers' output above (each line starts with its rank); resume with the same command "
            "and --resume",
        )
    return TrainResult.load(workspace.run(run_id).summary) if holds_rank_zero(topology, workspace, run_id) else None


def holds_rank_zero(topology: Topology, workspace: Workspace, run_id: str) -> bool:
    """Whether this node ran global rank 0 (and so wrote the result). Decided from the node's rank, or with c10d
    (torchrun assigns ranks) from rank 0's report: a shared workspace shows the result to every node."""
    if topology.rdzv_endpoint is None:
        return topology.node_rank == 0
    import socket

    from tuneloop.artifacts.training import RankReport

    report = workspace.run(run_id).rank_report(0)
    return report.exists() and RankReport.load(report).host == socket.gethostname()


def settle_run_id(
    config: LoopConfig, workspace: Workspace, dataset_id: str, topology: Topology, resume: bool, run_id: str | None
) -> str:
    """The run id every node of the job agrees on: the one given, the resumable run, a new one (single node), or one
    derived from the run key and the rendezvous address (multi-node without --run-id)."""
    key = run_key_for(config, workspace, dataset_id)
    if run_id is None and resume:
        found = find_resumable(workspace, key)
        run_id = found.run_id if found else None
    if run_id is not None:
        return run_id
    if not topology.multi_node:
        return new_run_id(config.project.name, key)
    meeting = topology.rdzv_endpoint or f"{topology.master_addr}:{topology.master_port}"
    derived = job_run_id(config.project.name, key, meeting)
    record = workspace.run(derived).record
    if record.exists() and RunRecord.load(record).status == "finished" and not resume:
        raise TuneloopError(
            f"run {derived} (derived from this config and {meeting}) has already finished",
            hint="pass the same new --run-id to every node of the job",
        )
    return derived


def _stderr_fileno() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): let the workers inherit
        return None
