"""`tuneloop launch kubeflow|skypilot|slurm`: the specs it writes, checked with each scheduler's own models and loaders,
and the per-node logic of each spec executed for every node of the job.

No scheduler can run here (no Kubernetes cluster, no cloud account, no Slurm controller), so:
- the TrainJob goes through the Kubeflow Trainer API's own `TrainJob` model (kubeflow-trainer-api, the models the
  Kubeflow SDK uses) and its volumes, mounts and resources, and storage.yaml, through Kubernetes' own JSON schemas
  (kubernetes-validate, strict);
- the SkyPilot task goes through SkyPilot's own loader (`sky.Task.from_yaml_config`, what `sky launch` calls), run in
  SkyPilot's own virtualenv (.venv-skypilot: SkyPilot pins click<8.2, which tuneloop's environment cannot take);
- the scripts the schedulers would run (the sbatch script, SkyPilot's `run`/`setup`, the TrainJob container's
  command) are executed by a real shell with the environment each scheduler gives each node, and with stand-ins
  only for what needs a cluster: `srun` (runs the command once per node, as srun does with one task per node),
  `scontrol` (lists the allocation's hosts) and `tuneloop` (records the arguments it received).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import Any, get_args

import kubernetes_validate
import pytest
import typer.main
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.cli.launch_commands import LaunchTargetChoice
from tuneloop.cluster import LaunchTarget, NodeRequest, plan_job
from tuneloop.errors import TuneloopError
from tuneloop.train.launch import node_command, shell_join

ROOT = Path(__file__).resolve().parents[2]
SKYPILOT_PYTHON = Path(os.environ.get("TUNELOOP_SKYPILOT_PYTHON", ROOT / ".venv-skypilot" / "bin" / "python"))
KUBERNETES_VERSION = "1.37.0"
runner = CliRunner()
TWO_NODES = ["--nnodes", "2", "--gpus-per-node", "1"]

# Stand-ins for what only a cluster has. Each records what it was given under $CALLS.
TUNELOOP_STANDIN = """#!/bin/bash
# stand-in for tuneloop: records the arguments this node's command received, one file per call
printf '%s\\0' "$@" > "$(mktemp "$CALLS/tuneloop.XXXXXX")"
"""
SRUN_STANDIN = """#!/bin/bash
# stand-in for srun inside an allocation: records its options, then runs the command once per node as srun does with
# --ntasks-per-node=1, each task with its own SLURM_NODEID / SLURM_PROCID
options=()
while [[ $# -gt 0 && $1 == --* ]]; do options+=("$1"); shift; done
printf '%s\\n' "${options[@]}" > "$CALLS/srun.options"
status=0
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" || status=$?
done
exit $status
"""
SCONTROL_STANDIN = """#!/bin/bash
# stand-in for scontrol: `show hostnames NODELIST` prints the allocation's hosts, one a line
printf '%s\\n' "$@" > "$CALLS/scontrol.args"
[[ $1 == show && $2 == hostnames ]] || exit 1
printf '%s\\n' $FAKE_HOSTS
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config that reads a data file next to it (data/train.jsonl) and a built-in source."""
    folder = tmp_path / "project"
    folder.mkdir()
    config = {
        "project": {"name": "SST2 demo"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [{"path": "data/train.jsonl"}, {"path": "builtin:extraction", "num_rows": 100}]},
        "train": {"max_steps": 20},
    }
    path = folder / "config.yaml"
    path.write_text("# my comment stays\n" + yaml.safe_dump(config))
    return path


def launch(target: str, config: Path, out: Path, *options: str) -> dict[str, Any]:
    result = runner.invoke(app, ["launch", target, "-c", str(config), "--out", str(out), *options, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def launch_error(target: str, config: Path, out: Path, *options: str) -> dict[str, Any]:
    result = runner.invoke(app, ["launch", target, "-c", str(config), "--out", str(out), *options, "--json"])
    assert result.exit_code == 2, result.output
    return json.loads(result.output)


def standins(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder with the stand-ins, and the folder they record into."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name, text in {"tuneloop": TUNELOOP_STANDIN, "srun": SRUN_STANDIN, "scontrol": SCONTROL_STANDIN}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def recorded_nodes(calls: Path) -> dict[int, list[str]]:
    """The arguments each node's `tuneloop` received, by --node-rank."""
    nodes: dict[int, list[str]] = {}
    for record in calls.glob("tuneloop.*"):
        arguments = record.read_bytes().decode().split("\0")[:-1]
        nodes[int(flag_value(arguments, "--node-rank"))] = arguments
    return nodes


def flag_value(arguments: list[str], flag: str) -> str:
    return arguments[arguments.index(flag) + 1]


def run_script(command: list[str], cwd: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=60)


def assert_same_job(nodes: dict[int, list[str]], nnodes: int, nproc: str, master_addr: str, run_id: str) -> None:
    """Every node got the same topology, its own rank, the same rendezvous address and run id, in arguments that the
    real `tuneloop train` parses (its own option parser, without starting training)."""
    assert sorted(nodes) == list(range(nnodes))
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    for rank, arguments in nodes.items():
        assert arguments[0] == "train"
        assert flag_value(arguments, "--nnodes") == str(nnodes)
        assert flag_value(arguments, "--nproc") == nproc
        assert flag_value(arguments, "--master-addr") == master_addr
        assert flag_value(arguments, "--run-id") == run_id
        parsed = train.make_context("train", arguments[1:]).params
        assert (parsed["node_rank"], parsed["nnodes"], parsed["nproc"]) == (rank, nnodes, int(nproc))
        assert (parsed["master_addr"], parsed["run_id"]) == (master_addr, run_id)


# -- the CLI's choices ---------------------------------------------------------------------------------------------
def test_cli_choices_are_the_launch_targets() -> None:
    assert get_args(LaunchTargetChoice) == get_args(LaunchTarget) == ("kubeflow", "skypilot", "slurm")


def test_an_unknown_target_is_refused_naming_the_valid_ones(config_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["launch", "nomad", "-c", str(config_file), *TWO_NODES, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert all(name in result.output for name in ("kubeflow", "skypilot", "slurm"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(TuneloopError, match="unknown launch target 'nomad'"):
        plan_job("nomad", config_file, None, NodeRequest(nnodes=2, gpus_per_node=1))  # type: ignore[arg-type]


# -- Kubeflow Trainer ----------------------------------------------------------------------------------------------
def kubeflow_job(config_file: Path, out: Path, *options: str) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = launch("kubeflow", config_file, out, "--image", "registry.example/tuneloop:0.1", *options)
    return summary, yaml.safe_load((out / "trainjob.yaml").read_text())


def node_pod_patch(trainjob: dict[str, Any]) -> dict[str, Any]:
    (patch,) = trainjob["spec"]["runtimePatches"]
    (replicated_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated_job["name"] == "node"
    return replicated_job["template"]["spec"]["template"]["spec"]


def test_trainjob_round_trips_through_the_kubeflow_trainer_model(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "kf"
    summary, document = kubeflow_job(config_file, out, "--nnodes", "3", "--gpus-per-node", "4", "--run-id", "sst2-3x4")
    model = TrainerV1alpha1TrainJob.from_dict(document)
    # The generated models keep only the fields the API defines: nothing may be lost on the way back.
    assert model.to_dict() == document
    assert model.api_version == "trainer.kubeflow.org/v1alpha1" and model.kind == "TrainJob"
    assert model.metadata.name == "sst2-3x4" == summary["name"]
    assert model.spec.runtime_ref.name == "torch-distributed"
    assert model.spec.runtime_ref.kind == "ClusterTrainingRuntime"
    trainer = model.spec.trainer
    assert trainer.num_nodes == 3 and trainer.num_proc_per_node == 4
    quantities = {name: quantity.actual_instance for name, quantity in trainer.resources_per_node.limits.items()}
    assert quantities == {"nvidia.com/gpu": "4", "memory": "128Gi"}
    quantities = {name: quantity.actual_instance for name, quantity in trainer.resources_per_node.requests.items()}
    assert quantities == {"cpu": "32", "memory": "128Gi"}
    assert trainer.image == "registry.example/tuneloop:0.1"
    assert trainer.command[:2] == ["/bin/sh", "-c"]
    assert {variable.name: variable.value for variable in trainer.env} == {
        "TUNELOOP_HOME": "/workspace",
        "HF_HOME": "/workspace/huggingface",
    }
    pod = model.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0].template.spec
    claims = {
        volume.name: volume.persistent_volume_claim.claim_name
        for volume in pod.template.spec.volumes
        if volume.persistent_volume_claim
    }
    assert claims == {"workspace": "tuneloop-workspace", "data": "tuneloop-data"}
    (container,) = pod.template.spec.containers
    mounts = {mount.mount_path: mount.name for mount in container.volume_mounts}
    assert mounts == {"/workspace": "workspace", "/job/data": "data", "/job/config.yaml": "config", "/dev/shm": "dshm"}


def test_trainjob_keeps_to_what_the_trainer_webhook_accepts(config_file: Path, tmp_path: Path) -> None:
    """The rules Kubeflow Trainer's admission webhook applies to runtimePatches (pkg/runtime/framework/plugins/jobset)
    and the CRD's name rules, restated: a cluster enforces them, so the spec must already keep them."""
    _, document = kubeflow_job(config_file, tmp_path / "kf", "--nnodes", "2", "--gpus-per-node", "8")
    (patch,) = document["spec"]["runtimePatches"]
    assert re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9._-]+$", patch["manager"])  # domain-prefixed path
    pod = node_pod_patch(document)
    assert [container["name"] for container in pod["containers"]] == ["node"]  # the runtime's only container
    assert all("env" not in container for container in pod["containers"])  # env of `node` only via spec.trainer
    name = document["metadata"]["name"]
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name) and len(name) <= 40
    assert not any(variable["name"].startswith("PET_") for variable in document["spec"]["trainer"]["env"])


def test_trainjob_volumes_and_storage_pass_kubernetes_schemas(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "kf"
    _, document = kubeflow_job(config_file, out, "--nnodes", "2", "--gpus-per-node", "8")
    trainer, patch = document["spec"]["trainer"], node_pod_patch(document)
    # The pod the runtime's `node` job gets once the patch and the trainer's fields are merged in.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "node-0"},
        "spec": {
            "volumes": patch["volumes"],
            "containers": [
                {
                    "name": "node",
                    "image": trainer["image"],
                    "command": trainer["command"],
                    "env": trainer["env"],
                    "resources": trainer["resourcesPerNode"],
                    "volumeMounts": patch["containers"][0]["volumeMounts"],
                }
            ],
        },
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    documents = list(yaml.safe_load_all((out / "storage.yaml").read_text()))
    assert [(item["kind"], item["metadata"]["name"]) for item in documents] == [
        ("PersistentVolumeClaim", "tuneloop-workspace"),
        ("PersistentVolumeClaim", "tuneloop-data"),
        ("Pod", "tuneloop-data-loader"),
    ]
    for item in documents:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    assert all(item["spec"]["accessModes"] == ["ReadWriteMany"] for item in documents[:2])
    # And the schemas do reject a mistake of this kind: a claim without its name.
    broken = json.loads(json.dumps(pod))
    del broken["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_trainjob_command_maps_the_torch_runtime_variables(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "kf"
    _, document = kubeflow_job(config_file, out, "--nnodes", "3", "--gpus-per-node", "2", "--run-id", "sst2-run")
    bin_dir, calls = standins(tmp_path)
    trainer, name = document["spec"]["trainer"], document["metadata"]["name"]
    for rank in range(trainer["numNodes"]):
        # What the torch plugin injects into pod `rank` (Kubeflow Trainer: plugins/torch/torch.go, EnforceMLPolicy).
        environment = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "CALLS": str(calls),
            **{variable["name"]: variable["value"] for variable in trainer["env"]},
            "PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": "29500",
        }
        result = run_script(trainer["command"], tmp_path, environment)
        assert result.returncode == 0, result.stderr
    nodes = recorded_nodes(calls)
    assert_same_job(nodes, 3, "2", "sst2-run-node-0-0.sst2-run", "sst2-run")
    assert all(flag_value(arguments, "-c") == "/job/config.yaml" for arguments in nodes.values())
    assert all(flag_value(arguments, "--master-port") == "29500" for arguments in nodes.values())


def test_trainjob_on_cpu_nodes_asks_for_no_gpu(config_file: Path, tmp_path: Path) -> None:
    _, document = kubeflow_job(
        config_file, tmp_path / "kf", "--nnodes", "2", "--gpus-per-node", "0", "--cpu-procs-per-node", "3"
    )
    trainer = document["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 3
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": "12", "memory": "24Gi"}
    assert TrainerV1alpha1TrainJob.from_dict(document).to_dict() == document


# -- SkyPilot ------------------------------------------------------------------------------------------------------
SKY_LOADER = textwrap.dedent(
    """
    import json, sys
    import yaml
    import sky

    overrides = json.loads(sys.argv[1])
    if overrides is None:  # exactly what `sky launch task.yaml` reads
        task = sky.Task.from_yaml("task.yaml")
    else:  # what `sky launch --env K=V task.yaml` does: the YAML's config with the overrides
        config = yaml.safe_load(open("task.yaml"))
        task = sky.Task.from_yaml_config(config, env_overrides=list(overrides.items()))
    task.expand_and_validate_workdir()  # as `sky launch` does: relative to where it is called
    (resources,) = task.resources
    print(json.dumps({
        "num_nodes": task.num_nodes, "accelerators": resources.accelerators, "cpus": resources.cpus,
        "memory": resources.memory, "image_id": resources.image_id, "workdir": task.workdir, "envs": task.envs,
        "setup": task.setup, "run": task.run,
    }))
    """
)


def load_with_skypilot(folder: Path, env_overrides: dict[str, str] | None, home: Path) -> dict[str, Any]:
    if not SKYPILOT_PYTHON.exists():
        pytest.skip(
            f"SkyPilot's virtualenv is missing ({SKYPILOT_PYTHON}): python -m venv .venv-skypilot && "
            ".venv-skypilot/bin/pip install skypilot==0.14.1"
        )
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(home)}  # SkyPilot keeps its state under ~/.sky
    result = run_script([str(SKYPILOT_PYTHON), "-c", SKY_LOADER, json.dumps(env_overrides)], folder, environment)
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_skypilot_task_loads_with_skypilot(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sky"
    launch("skypilot", config_file, out, "--nnodes", "2", "--gpus-per-node", "8", "--gpu-type", "H100")
    task = load_with_skypilot(out, {"TUNELOOP_INSTALL": "./tuneloop-0.1.0-py3-none-any.whl"}, tmp_path)
    assert task["num_nodes"] == 2
    assert task["accelerators"] == {"H100": 8}
    assert (task["cpus"], task["memory"]) == ("64+", "256+")
    assert task["workdir"] == str(out)  # `workdir: .` is this folder when launched from it
    assert task["envs"]["TUNELOOP_INSTALL"] == "./tuneloop-0.1.0-py3-none-any.whl"
    assert "tuneloop train -c config.yaml --nproc $SKYPILOT_NUM_GPUS_PER_NODE" in task["run"]
    # Without the install requirement, SkyPilot itself refuses to launch.
    with pytest.raises(AssertionError, match="TUNELOOP_INSTALL"):
        load_with_skypilot(out, None, tmp_path)


def test_skypilot_task_with_an_image_needs_no_install(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sky"
    launch("skypilot", config_file, out, "--nnodes", "1", "--gpus-per-node", "0", "--image", "registry.example/tl:1")
    task = load_with_skypilot(out, None, tmp_path)
    assert task["num_nodes"] == 1 and task["accelerators"] is None
    assert "registry.example/tl:1" in json.dumps(task["image_id"])
    assert "TUNELOOP_INSTALL" not in task["envs"]


def test_skypilot_run_script_maps_the_node_variables(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sky"
    launch("skypilot", config_file, out, "--nnodes", "3", "--gpus-per-node", "4", "--gpu-type", "A100-80GB")
    task = yaml.safe_load((out / "task.yaml").read_text())
    bin_dir, calls = standins(tmp_path)
    node_ips = "192.0.2.10\n192.0.2.11\n192.0.2.12"  # documentation addresses: nothing is contacted
    for rank in range(3):
        # The variables SkyPilot sets for `setup` and `run` on each node (sky/skylet/constants.py, task_codegen.py).
        environment = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "CALLS": str(calls),
            **task["envs"],
            "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NUM_NODES": "3",
            "SKYPILOT_NUM_GPUS_PER_NODE": "4",
            "SKYPILOT_NODE_IPS": node_ips,
            "SKYPILOT_TASK_ID": "sky-2026-01-01-00-00-00-000000_sst2_1",
        }
        environment.pop("TUNELOOP_INSTALL")
        setup = run_script(["bash", "-c", task["setup"]], out, environment)
        assert setup.returncode == 0, setup.stderr  # tuneloop is on PATH: nothing to install
        result = run_script(["bash", "-c", task["run"]], out, environment)
        assert result.returncode == 0, result.stderr
    assert_same_job(recorded_nodes(calls), 3, "4", "192.0.2.10", "sky-2026-01-01-00-00-00-000000_sst2_1")
    # Without tuneloop and without TUNELOOP_INSTALL, setup stops with the fix instead of installing nothing.
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    setup = run_script(["bash", "-c", task["setup"]], out, bare)
    assert setup.returncode != 0 and "--env TUNELOOP_INSTALL=" in setup.stderr


def test_skypilot_cpu_nodes_pass_the_process_count(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sky"
    launch("skypilot", config_file, out, "--nnodes", "2", "--gpus-per-node", "0", "--cpu-procs-per-node", "2")
    task = yaml.safe_load((out / "task.yaml").read_text())
    assert "accelerators" not in task["resources"]
    assert task["resources"]["cpus"] == "8+"
    assert "--nproc 2 " in task["run"]  # SKYPILOT_NUM_GPUS_PER_NODE is 0 on CPU nodes


# -- Slurm ---------------------------------------------------------------------------------------------------------
def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[name] = value
    return options


def test_sbatch_script_is_valid_bash_with_the_resources(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    launch("slurm", config_file, out, "--nnodes", "4", "--gpus-per-node", "8", "--gpu-type", "h100")
    script = out / "job.sbatch"
    syntax = run_script(["bash", "-n", str(script)], out, {"PATH": "/usr/bin:/bin"})
    assert syntax.returncode == 0, syntax.stderr
    options = sbatch_options(script.read_text())
    assert options == {
        "--job-name": "sst2-demo",
        "--nodes": "4",
        "--ntasks-per-node": "1",
        "--gpus-per-node": "h100:8",
        "--cpus-per-task": "64",
        "--mem": "256G",
        "--output": "slurm-%x-%j.out",
    }
    # #SBATCH lines count only before the first command.
    lines = script.read_text().splitlines()
    first_command = next(index for index, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(index for index, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command


def test_sbatch_script_starts_one_node_command_per_node(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    launch("slurm", config_file, out, "--nnodes", "2", "--gpus-per-node", "4", "--set", "train.max_steps=5")
    bin_dir, calls = standins(tmp_path)
    environment = {  # what sbatch gives the batch script on the first node of a 2-node allocation
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "FAKE_HOSTS": "gpu07 gpu08",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(out),
    }
    result = run_script(["bash", str(out / "job.sbatch")], out, environment)
    assert result.returncode == 0, result.stderr
    assert (calls / "scontrol.args").read_text().split() == ["show", "hostnames", "gpu[07-08]"]
    assert (calls / "srun.options").read_text().split() == [
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--kill-on-bad-exit=1",
    ]
    nodes = recorded_nodes(calls)
    assert_same_job(nodes, 2, "4", "gpu07", "sst2-demo-4242")
    assert flag_value(nodes[1], "--node-rank") == "1"
    assert all(flag_value(arguments, "--master-port") == str(20000 + 4242 % 20000) for arguments in nodes.values())
    assert all(arguments[-3:] == ["--set", "train.max_steps=5", "--resume"] for arguments in nodes.values())


def test_sbatch_script_called_elsewhere_says_where_to_call_it(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    launch("slurm", config_file, out, *TWO_NODES)
    result = run_script(["bash", str(out / "job.sbatch")], tmp_path, {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "call sbatch from the job's folder" in result.stderr


# -- the same node command everywhere ------------------------------------------------------------------------------
def spec_node_line(target: str, out: Path) -> str:
    """The command line each target's spec runs on a node, read back from the file the scheduler gets."""
    if target == "kubeflow":
        command = yaml.safe_load((out / "trainjob.yaml").read_text())["spec"]["trainer"]["command"]
        return command[2].removeprefix("exec ")
    if target == "skypilot":
        run = yaml.safe_load((out / "task.yaml").read_text())["run"]
        return run.strip().splitlines()[-1].removeprefix("exec ")
    srun = next(
        line for line in (out / "job.sbatch").read_text().split("srun ", 1)[1].splitlines() if "bash -c" in line
    )
    return shlex.split(srun)[-1].removeprefix("exec ")


# For each target, the scheduler's variables for each of node_command's inputs.
NODE_INPUTS: dict[str, dict[str, str]] = {
    "kubeflow": {
        "config_file": "/job/config.yaml",
        "nproc": "$PET_NPROC_PER_NODE",
        "nnodes": "$PET_NNODES",
        "node_rank": "$PET_NODE_RANK",
        "master_addr": "$PET_MASTER_ADDR",
        "master_port": "$PET_MASTER_PORT",
        "run_id": "golden-run",
    },
    "skypilot": {
        "config_file": "config.yaml",
        "nproc": "$SKYPILOT_NUM_GPUS_PER_NODE",
        "nnodes": "$SKYPILOT_NUM_NODES",
        "node_rank": "$SKYPILOT_NODE_RANK",
        "master_addr": "$MASTER_ADDR",
        "master_port": "29500",
        "run_id": "golden-run",
    },
    "slurm": {
        "config_file": "config.yaml",
        "nproc": "2",
        "nnodes": "$SLURM_JOB_NUM_NODES",
        "node_rank": "$SLURM_NODEID",
        "master_addr": "$MASTER_ADDR",
        "master_port": "$MASTER_PORT",
        "run_id": "$RUN_ID",
    },
}


@pytest.mark.parametrize("target", ["kubeflow", "skypilot", "slurm"])
def test_every_target_runs_train_launch_node_command(target: str, config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / target
    overrides = ["train.max_steps=7", "project.name=with space"]
    extra = {"kubeflow": ["--image", "registry.example/tl:1"], "skypilot": ["--gpu-type", "L4"], "slurm": []}[target]
    options = ["--nnodes", "2", "--gpus-per-node", "2", "--run-id", "golden-run", *extra]
    summary = launch(target, config_file, out, *options, *[part for item in overrides for part in ("--set", item)])
    inputs = NODE_INPUTS[target]
    expected = node_command(inputs.pop("config_file"), **inputs, overrides=overrides, resume=True)
    assert summary["node_command"] == expected
    assert spec_node_line(target, out) == shell_join(expected)


# -- what every target writes, and what it refuses -----------------------------------------------------------------
@pytest.mark.parametrize("target", ["kubeflow", "skypilot", "slurm"])
def test_the_config_travels_with_the_job_and_the_readme_says_where_data_goes(
    target: str, config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / target
    extra = {"kubeflow": ["--image", "registry.example/tl:1"], "skypilot": ["--gpu-type", "L4"], "slurm": []}[target]
    summary = launch(target, config_file, out, *TWO_NODES, *extra)
    assert (out / "config.yaml").read_bytes() == config_file.read_bytes()  # verbatim, comments included
    assert sorted(path.name for path in out.iterdir()) == summary["files"]
    readme = (out / "README.md").read_text()
    assert "| `data.sources.0.path` | `data/train.jsonl` |" in readme
    assert "builtin:extraction" not in readme
    for command in summary["submit"]:
        assert command in readme


def test_kubeflow_readme_flags_data_outside_the_data_volume(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "kf"
    kubeflow_job(config_file, out, *TWO_NODES, "--set", "data.sources.0.path=rows.jsonl")
    readme = (out / "README.md").read_text()
    assert "**Not on any volume yet:** `data.sources.0.path` (`rows.jsonl`)" in readme


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--nnodes", "0", "--gpus-per-node", "1"], "--nnodes must be at least 1 (got 0)"),
        (["--nnodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node must be 0 or more (got -1)"),
        (["--nnodes", "2", "--gpus-per-node", "2", "--cpu-procs-per-node", "4"], "--cpu-procs-per-node is for CPU"),
        (["--nnodes", "2", "--gpus-per-node", "0", "--cpu-procs-per-node", "0"], "--cpu-procs-per-node must be"),
        ([*TWO_NODES, "--cpus-per-node", "0"], "--cpus-per-node and --memory-gb-per-node must be at least 1"),
        ([*TWO_NODES, "--image", "x:1"], "--image is for kubeflow and skypilot"),
        ([*TWO_NODES, "--run-id", "a b"], "--run-id 'a b' must be letters"),
        ([*TWO_NODES, "--set", "train.lerning_rate=1"], "did you mean 'learning_rate'"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(
    options: list[str], message: str, config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    error = launch_error("slurm", config_file, out, *options)
    assert message in error["error"] and error["hint"]
    assert not out.exists()


def test_target_specific_requirements(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert "kubeflow needs --image" in launch_error("kubeflow", config_file, out, *TWO_NODES)["error"]
    bad_name = launch_error("kubeflow", config_file, out, *TWO_NODES, "--image", "x:1", "--run-id", "Upper_Case")
    assert "cannot name a TrainJob" in bad_name["error"]
    assert "skypilot needs --gpu-type" in launch_error("skypilot", config_file, out, *TWO_NODES)["error"]
    assert (
        "--gpu-type is for skypilot and slurm"
        in launch_error("kubeflow", config_file, out, *TWO_NODES, "--image", "x:1", "--gpu-type", "H100")["error"]
    )
    assert not out.exists()


def test_an_invalid_or_missing_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: many\n")
    error = launch_error("slurm", bad, tmp_path / "out", *TWO_NODES)
    assert "train.max_steps" in error["error"] and error["type"] == "ConfigError"
    error = launch_error("slurm", tmp_path / "absent.yaml", tmp_path / "out", *TWO_NODES)
    assert "config file not found" in error["error"]
    assert not (tmp_path / "out").exists()


def test_out_must_be_new_or_empty_unless_forced(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    options = TWO_NODES
    assert "is not empty" in launch_error("slurm", config_file, out, *options)["error"]
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    launch("slurm", config_file, out, *options, "--force")
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.yaml", "job.sbatch", "notes.txt"]
    launch("slurm", config_file, out, *options, "--force")  # again: replaces its own files


def test_out_that_cannot_be_written_is_refused(config_file: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    options = TWO_NODES
    assert "is not a folder" in launch_error("slurm", config_file, a_file, *options)["error"]
    error = launch_error("slurm", config_file, a_file / "inside", *options)
    assert "cannot write the job's files into" in error["error"]


def test_the_table_output_names_the_submit_command(config_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["launch", "slurm", "-c", str(config_file), *TWO_NODES, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "sbatch job.sbatch" in result.output and "README.md" in result.output
