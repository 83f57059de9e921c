"""A real two-node job: `tuneloop train --nnodes 2` on two "hosts" made of Linux network namespaces (tests/train/netns.py).

Each node has its own network stack, hostname, /etc/hosts and workspace, as two machines would; the only way between
them is the veth pair, so a passing run proves that torchrun's store and gloo's collectives crossed it (the namespaces
have no route to any other address). Both ways to meet are run: static (--node-rank/--master-addr/--master-port) and
c10d rendezvous (--rdzv-endpoint). The result is read from outside the workers: node 0's run and summary, and the
RankReport each node's worker wrote into its own workspace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.train.netns import HostsUnavailable, TwoHosts, create_hosts

pytestmark = pytest.mark.slow

PORT = 29500  # free by construction: the namespaces are new
RUN_ID = "two-node-run"
NODE_TIMEOUT_S = 150  # one run takes ~35 s here; a hung rendezvous must not hang the suite
FAILURE_GRACE_S = 15  # after one node fails, how long the other may take to notice before it is killed
# Variables of an outer torchrun (or of a shell that set them) would change what the nodes' launchers do.
INHERITED_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")


@dataclass
class NodeRun:
    rank: int  # the node's rank, and its one worker's global rank (one process per node)
    workspace: Path
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def payload(self) -> dict:
        text = self.stdout.read_text()
        return json.loads(text) if text.strip().startswith("{") else {}

    def log(self) -> str:
        stdout, stderr = self.stdout.read_text()[-1500:], self.stderr.read_text()[-4000:]
        return f"--- node {self.rank} stdout:\n{stdout}\n--- node {self.rank} stderr:\n{stderr}"


@pytest.fixture(params=[False], ids=["names-resolve-to-veth"])
def two_hosts(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TwoHosts]:
    try:
        hosts = create_hosts(tmp_path / "hosts", names_on_loopback=request.param)
    except HostsUnavailable as reason:
        pytest.skip(f"cannot make two hosts from network namespaces: {reason}")
    try:
        yield hosts
    finally:
        hosts.remove()


def start_node(
    hosts: TwoHosts, rank: int, config: Path, folder: Path, meeting: list[str], gloo_interface: bool = True
) -> NodeRun:
    host = hosts.hosts[rank]
    workspace = folder / f"node{rank}-workspace"
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in INHERITED_LAUNCH_VARIABLES and not key.startswith("PET_")  # PET_*: torchrun's options
    }
    # GLOO_SOCKET_IFNAME: gloo binds to the veth, not to what the hostname resolves to (127.0.0.1 on many machines,
    # which the other node cannot reach). TP_SOCKET_IFNAME is TensorPipe's (torch RPC) and plays no part in DDP.
    environment["TUNELOOP_HOME"] = str(workspace)
    if gloo_interface:  # without it, tuneloop picks the interface that routes to node 0 itself
        environment["GLOO_SOCKET_IFNAME"] = host.interface
    argv = [sys.executable, "-m", "tuneloop.cli", "train", "-c", str(config), "--json"]
    argv += ["--nproc", "1", "--nnodes", "2", *meeting, "--run-id", RUN_ID]
    stdout, stderr = folder / f"node{rank}.out", folder / f"node{rank}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            host.command(argv), env=environment, stdout=out, stderr=err, start_new_session=True, cwd=folder
        )
    return NodeRun(rank, workspace, process, stdout, stderr)


def wait_for(nodes: list[NodeRun], hosts: TwoHosts) -> None:
    """Wait for both nodes, bounded: a node that fails leaves the other waiting for it, so stop that one soon."""
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while any(node.process.poll() is None for node in nodes) and time.monotonic() < deadline:
        if any(node.process.poll() not in (None, 0) for node in nodes):
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        time.sleep(0.5)
    if any(node.process.poll() is None for node in nodes):
        hosts.kill_processes()
        for node in nodes:
            node.process.wait(timeout=30)


def run_two_nodes(
    hosts: TwoHosts, config: Path, folder: Path, meeting: list[list[str]], gloo_interface: bool = True
) -> list[NodeRun]:
    nodes = [start_node(hosts, rank, config, folder, meeting[rank], gloo_interface) for rank in (0, 1)]
    wait_for(nodes, hosts)
    logs = "\n".join(node.log() for node in nodes)
    assert [node.process.returncode for node in nodes] == [0, 0], logs
    return nodes


def check_job(nodes: list[NodeRun], hosts: TwoHosts) -> None:
    node0, node1 = nodes
    summary = node0.payload()
    assert summary.get("run_id") == RUN_ID, node0.log()
    # Node 0's workspace: exactly one run, finished, with one adapter; only its own rank's report.
    runs = sorted((node0.workspace / "runs").iterdir())
    assert [run.name for run in runs] == [RUN_ID]
    run_dir = runs[0]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "summary.json").read_text())["tokens"] == summary["tokens"]
    assert [path.name for path in (run_dir / "adapter").glob("*.safetensors")] == ["adapter_model.safetensors"]
    assert [path.name for path in (run_dir / "ranks").iterdir()] == ["rank-0.json"]
    # Node 1's workspace: its worker's report, and no result (only global rank 0 writes the run).
    node1_run = node1.workspace / "runs" / RUN_ID
    assert [path.name for path in (node1_run / "ranks").iterdir()] == ["rank-1.json"]
    assert not (node1_run / "summary.json").exists() and not (node1_run / "adapter").exists()
    reports = [
        json.loads((node.workspace / "runs" / RUN_ID / "ranks" / f"rank-{node.rank}.json").read_text())
        for node in nodes
    ]
    for node, report in zip(nodes, reports, strict=True):
        assert (report["rank"], report["world_size"], report["local_rank"]) == (node.rank, 2, 0)
        assert report["host"] == hosts.hosts[node.rank].hostname  # the rank ran on the host it was meant for
        assert report["strategy"] == "ddp" and report["tokens"] > 0
    assert summary["tokens"] == sum(report["tokens"] for report in reports)
    assert reports[0]["trainable_sha256"] == reports[1]["trainable_sha256"]  # DDP averaged over the veth
    assert "finished its share" in node1.stderr.read_text()
    assert node1.payload()["finished"] is True


@pytest.fixture
def node_config(train_config) -> Path:
    # fp32: the two ranks' weights hash equal bit for bit; few steps, the launch dominates anyway.
    return train_config(max_steps=4, eval_every=2, save_every=2, precision="fp32", report_to=[])


def test_static_rendezvous_over_two_hosts(two_hosts: TwoHosts, node_config: Path, tmp_path: Path) -> None:
    master = ["--master-addr", two_hosts.hosts[0].address, "--master-port", str(PORT)]
    nodes = run_two_nodes(two_hosts, node_config, tmp_path, [["--node-rank", str(rank), *master] for rank in (0, 1)])
    check_job(nodes, two_hosts)
    assert nodes[1].payload() == {"node_rank": 1, "finished": True}


@pytest.mark.parametrize("two_hosts", [True], indirect=True, ids=["names-resolve-to-loopback"])
def test_c10d_rendezvous_over_two_hosts(two_hosts: TwoHosts, node_config: Path, tmp_path: Path) -> None:
    """The harder, common case: each hostname resolves to 127.0.1.1 and GLOO_SOCKET_IFNAME is not set. torchrun
    would pick the rendezvous host and the workers' meeting address from the hostname (both wrong here); tuneloop
    passes `--local-addr` and `is_host` from the endpoint address and sets gloo's interface to the one that routes
    to node 0. torchrun assigns ranks, so the node reports no rank of its own."""
    endpoint = ["--rdzv-endpoint", f"{two_hosts.hosts[0].address}:{PORT}"]
    nodes = run_two_nodes(two_hosts, node_config, tmp_path, [endpoint, endpoint], gloo_interface=False)
    check_job(nodes, two_hosts)
    assert nodes[1].payload() == {"node_rank": None, "finished": True}
