"""What the three cluster launchers share: the job's shape, checked before anything is written; the per-node command
(always `train.launch.node_command`); the files the config reads, which must be on the cluster too; and the output
folder, written only once everything has been rendered."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from tuneloop.config import LoopConfig
from tuneloop.config_file import load_config
from tuneloop.data.sources import BUILTIN_PREFIX
from tuneloop.errors import TuneloopError
from tuneloop.train.launch import node_command, shell_join

LaunchTarget = Literal["kubeflow", "skypilot", "slurm"]

CONFIG_NAME = "config.yaml"
README_NAME = "README.md"
# Defaults per node when --cpus-per-node / --memory-gb-per-node are not given: enough host cores for each GPU's
# dataloader and tokenizer threads, and host memory for loading the weights before they move to the GPU.
CPUS_PER_GPU = 8
MEMORY_GB_PER_GPU = 32
CPUS_PER_CPU_PROCESS = 4
MEMORY_GB_PER_CPU_PROCESS = 8
# A run id becomes a folder name and a literal in shell scripts: keep it to characters that need no quoting.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class NodeRequest:
    """What the user asked for (the CLI's options), before any check."""

    nnodes: int
    gpus_per_node: int
    cpu_procs_per_node: int | None = None
    cpus_per_node: int | None = None
    memory_gb_per_node: int | None = None
    gpu_type: str | None = None
    image: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class JobInput:
    """A file or folder the config reads, which the job needs on every node."""

    key: str  # where the config names it, for --set
    path: str  # as written in the config

    @property
    def relative(self) -> bool:
        return not Path(self.path).expanduser().is_absolute()


@dataclass(frozen=True)
class ClusterJob:
    """A checked request: the validated config, the nodes, and the names the scheduler will know the job by."""

    target: LaunchTarget
    config_file: Path
    config: LoopConfig
    overrides: tuple[str, ...]
    nnodes: int
    gpus_per_node: int
    procs_per_node: int  # torchrun processes per node: one per GPU, or --cpu-procs-per-node on CPU nodes
    cpus_per_node: int
    memory_gb_per_node: int
    gpu_type: str | None
    image: str | None
    run_id: str | None  # None: each launcher uses its scheduler's job id
    name: str  # the job's name on the scheduler (the TrainJob's metadata.name on Kubeflow)
    inputs: tuple[JobInput, ...] = field(default=())

    def node_command(
        self,
        *,
        config_path: str = CONFIG_NAME,
        nproc: str,
        nnodes: str,
        node_rank: str,
        master_addr: str,
        master_port: str,
        run_id: str,
    ) -> list[str]:
        """The `tuneloop train` command one node runs; values may be the scheduler's shell variables."""
        return node_command(
            config_path,
            nproc=nproc,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            run_id=run_id,
            overrides=list(self.overrides),
            resume=True,  # a requeued or recovered job continues its run from the last checkpoint
        )


@dataclass(frozen=True)
class LaunchSpec:
    """What one launcher renders: its files (besides the config copy), how to submit them, what every node runs."""

    files: dict[str, str]
    submit: list[str]
    node_command: list[str]


@dataclass(frozen=True)
class LaunchResult:
    target: LaunchTarget
    out: Path
    files: list[str]
    submit: list[str]
    node_command: list[str]
    name: str

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "out": str(self.out),
            "name": self.name,
            "files": self.files,
            "submit": self.submit,
            "node_command": self.node_command,
            "node_command_line": shell_join(self.node_command),
        }


def plan_job(target: LaunchTarget, config_file: Path, overrides: list[str] | None, request: NodeRequest) -> ClusterJob:
    """Check the request and load the config (with its overrides) so that nothing is written for a job that could
    not start."""
    if target not in get_args(LaunchTarget):
        raise TuneloopError(
            f"unknown launch target {target!r}", hint=f"use one of: {', '.join(get_args(LaunchTarget))}"
        )
    if request.nnodes < 1:
        raise TuneloopError(f"--nnodes must be at least 1 (got {request.nnodes})", hint="pass --nnodes 2 for two nodes")
    if request.gpus_per_node < 0:
        raise TuneloopError(
            f"--gpus-per-node must be 0 or more (got {request.gpus_per_node})",
            hint="0 runs on CPU nodes (--cpu-procs-per-node processes each); N runs one process per GPU",
        )
    procs = _processes_per_node(request)
    _check_target_options(target, request)
    config = load_config(config_file, overrides)
    units = request.gpus_per_node or procs
    cpus = request.cpus_per_node
    if cpus is None:
        cpus = units * (CPUS_PER_GPU if request.gpus_per_node else CPUS_PER_CPU_PROCESS)
    memory = request.memory_gb_per_node
    if memory is None:
        memory = units * (MEMORY_GB_PER_GPU if request.gpus_per_node else MEMORY_GB_PER_CPU_PROCESS)
    if cpus < 1 or memory < 1:
        raise TuneloopError(
            "--cpus-per-node and --memory-gb-per-node must be at least 1", hint="leave them out for the defaults"
        )
    if request.run_id is not None:
        _check_run_id(target, request.run_id)
    return ClusterJob(
        target=target,
        config_file=config_file,
        config=config,
        overrides=tuple(overrides or []),
        nnodes=request.nnodes,
        gpus_per_node=request.gpus_per_node,
        procs_per_node=procs,
        cpus_per_node=cpus,
        memory_gb_per_node=memory,
        gpu_type=request.gpu_type,
        image=request.image,
        run_id=request.run_id,
        name=request.run_id or default_job_name(target, config.project.name),
        inputs=tuple(job_inputs(config)),
    )


def _processes_per_node(request: NodeRequest) -> int:
    if request.gpus_per_node > 0:
        if request.cpu_procs_per_node is not None:
            raise TuneloopError(
                "--cpu-procs-per-node is for CPU nodes (--gpus-per-node 0)",
                hint="GPU nodes run one training process per GPU; drop --cpu-procs-per-node",
            )
        return request.gpus_per_node
    procs = 1 if request.cpu_procs_per_node is None else request.cpu_procs_per_node
    if procs < 1:
        raise TuneloopError(
            f"--cpu-procs-per-node must be at least 1 (got {procs})", hint="CPU nodes run 1 training process by default"
        )
    return procs


def _check_target_options(target: LaunchTarget, request: NodeRequest) -> None:
    """Options one scheduler needs and another cannot use: refused rather than silently dropped."""
    if target == "kubeflow" and not request.image:
        raise TuneloopError(
            "kubeflow needs --image: a container image with tuneloop (and torch) installed",
            hint="build one from this repository (pip install . torch) and push it where the cluster can pull it",
        )
    if target == "slurm" and request.image:
        raise TuneloopError(
            "slurm runs tuneloop from the environment sbatch is called in; --image is for kubeflow and skypilot",
            hint="activate the virtualenv that has tuneloop before `sbatch`, and drop --image",
        )
    if target == "skypilot" and request.gpus_per_node > 0 and not request.gpu_type:
        raise TuneloopError(
            "skypilot needs --gpu-type to pick machines (SkyPilot has no generic GPU)",
            hint="e.g. --gpu-type H100 or --gpu-type A100-80GB; `sky show-gpus` lists the names",
        )
    if target == "kubeflow" and request.gpu_type:
        raise TuneloopError(
            "kubeflow requests GPUs as nvidia.com/gpu; --gpu-type is for skypilot and slurm",
            hint="to pin a GPU model, add a nodeSelector to trainjob.yaml's runtimePatches",
        )
    if request.gpu_type and request.gpus_per_node == 0:
        raise TuneloopError(
            "--gpu-type needs --gpus-per-node of 1 or more", hint="drop --gpu-type for CPU nodes (--gpus-per-node 0)"
        )


def _check_run_id(target: LaunchTarget, run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise TuneloopError(
            f"--run-id {run_id!r} must be letters, digits, '.', '_' or '-' (it names the run's folder)",
            hint="e.g. --run-id sst2-lora-2nodes",
        )
    # The TrainJob is named after the run: an RFC 1035 label (the CRD's rule), short enough that its pods' hostnames
    # (`<name>-node-0-<index>`, which PET_MASTER_ADDR names) stay within the 63-character label limit.
    if target == "kubeflow" and (not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", run_id) or len(run_id) > 40):
        raise TuneloopError(
            f"--run-id {run_id!r} cannot name a TrainJob: lower-case letters, digits and '-', starting with a letter, "
            "at most 40 characters",
            hint="e.g. --run-id sst2-lora-2nodes",
        )


def dns_label(text: str, limit: int) -> str:
    """`text` as the start of a Kubernetes name: lower case, digits and '-', starting with a letter."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"tl-{slug}".rstrip("-")
    return slug[:limit].rstrip("-")


def default_job_name(target: LaunchTarget, project: str) -> str:
    """Kubeflow: a unique TrainJob name (it is also the run id); Slurm and SkyPilot: the project, since their own job
    ids make each run unique."""
    if target == "kubeflow":
        return f"{dns_label(project, 24)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dns_label(project, 40)


def job_inputs(config: LoopConfig) -> list[JobInput]:
    """The files and folders the config reads (data sources, eval data, a local base model, a chat template file)."""
    found = [
        JobInput(f"data.sources.{index}.path", source.path)
        for index, source in enumerate(config.data.sources)
        if not source.path.startswith(BUILTIN_PREFIX)
    ]
    if config.eval.data is not None and not config.eval.data.path.startswith(BUILTIN_PREFIX):
        found.append(JobInput("eval.data.path", config.eval.data.path))
    base = config.model.base
    # base_model_spec() differs from what was written when a relative path names a folder next to the config.
    if Path(base).expanduser().is_absolute() or config.base_model_spec() != base:
        found.append(JobInput("model.base", base))
    template = config.model.chat_template
    if template is not None and template.endswith(".jinja"):
        found.append(JobInput("model.chat_template", template))
    return found


def write_out(out: Path, force: bool, job: ClusterJob, spec: LaunchSpec, readme: str) -> list[str]:
    """Write the rendered files, the config copy and the README into `out`. Refuses a folder that has anything in it
    unless `force` (then only these files are replaced)."""
    if out.exists() and not out.is_dir():
        raise TuneloopError(f"--out {out} exists and is not a folder", hint="pass a new folder for the job's files")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TuneloopError(
            f"--out {out} is not empty",
            hint="pass an empty or new folder, or --force to replace the files written here",
        )
    contents = {**spec.files, README_NAME: readme}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (out / name).write_text(text, encoding="utf-8")
        copy = out / CONFIG_NAME
        if not (copy.exists() and copy.samefile(job.config_file)):
            shutil.copyfile(job.config_file, copy)
    except OSError as error:
        raise TuneloopError(
            f"cannot write the job's files into {out}: {error.strerror or error}",
            hint="pass an --out folder you can write to",
        ) from error
    return sorted([*contents, CONFIG_NAME])


# -- README parts every target shares ------------------------------------------------------------------------------
def inputs_section(job: ClusterJob, where: Callable[[JobInput], str]) -> str:
    """A README section: each file the config reads and where the job looks for it on the cluster (`where`)."""
    lines = ["## Data and model", ""]
    if not job.inputs:
        lines.append(
            "The config reads no local files (built-in data, a bundled or hub model), so nothing needs copying. "
            "A hub model is downloaded on each node: the nodes need access to the Hugging Face Hub."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "Relative paths in the config resolve against the config file's folder, on the cluster as here. The config "
        "reads:",
        "",
        "| config key | path in the config | on the cluster |",
        "|---|---|---|",
    ]
    lines += [f"| `{item.key}` | `{item.path}` | {where(item)} |" for item in job.inputs]
    lines += [
        "",
        "To point a key somewhere else without editing the config, launch again with `--set KEY=PATH` (it is added to "
        "every node's command).",
    ]
    return "\n".join(lines) + "\n"


def mapping_table(rows: list[tuple[str, str, str]]) -> str:
    """A README table: tuneloop's flag, the value each node passes, where it comes from."""
    lines = ["| `tuneloop train` flag | value | from |", "|---|---|---|"]
    lines += [f"| `{flag}` | `{value}` | {source} |" for flag, value, source in rows]
    return "\n".join(lines) + "\n"


def overrides_note(job: ClusterJob) -> str:
    if not job.overrides:
        return ""
    shown = ", ".join(f"`--set {override}`" for override in job.overrides)
    return f"\nEvery node also passes {shown}: the overrides this spec was generated with.\n"


class _SpecDumper(yaml.SafeDumper):
    """YAML for people: multi-line strings (scripts) as `|` blocks, keys in the order written."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_SpecDumper.add_representer(str, _represent_text)


def dump_yaml(*documents: dict[str, Any]) -> str:
    return yaml.dump_all(documents, Dumper=_SpecDumper, sort_keys=False, width=1_000_000, allow_unicode=True)
