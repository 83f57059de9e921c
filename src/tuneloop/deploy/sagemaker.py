"""`tuneloop deploy sagemaker`: SageMaker Python SDK v3 code that serves the version on a real-time endpoint and
trains it again as a SageMaker training job.

Serving (`deploy_endpoint.py`): the model folder is uploaded to S3 as it is (`model/` under deploy.storage_uri, or
s3://SAGEMAKER-DEFAULT-BUCKET/tuneloop/NAME-vN) and SageMaker copies it to /opt/ml/model. The container is AWS's
vLLM image for SageMaker, whose entrypoint turns every SM_VLLM_NAME=value variable into vLLM's `--name value` and
adds `--port 8080`, so the engine receives exactly `ctx.vllm_arguments(MODEL_ROOT)`, the flags `tuneloop serve` runs.
`ModelBuilder` (sagemaker.serve) builds the SageMaker Model from that image, the variables and the S3 prefix, and
deploys it as the base inference component; each adapter becomes an adapter inference component
(`BaseInferenceComponentName` + the adapter's tar.gz as `ArtifactUrl`, sagemaker-core's shapes), which is how
SageMaker routes a request to one LoRA adapter. Application Auto Scaling scales the base component's copy count.

Training (`train_job.py`): `ModelTrainer` (sagemaker.train) runs `tuneloop train` once per instance with torchrun's
topology taken from the variables SageMaker's training toolkit sets (SM_NUM_GPUS, SM_HOST_COUNT,
SM_CURRENT_HOST_RANK = the host's index in sorted SM_HOSTS, SM_MASTER_ADDR = its first host), the same per-node
command the cluster launchers run (`train.launch.node_command`). `tuneloop train --nproc` is itself the torchrun
launcher (it prepares data and settles the run id before starting the workers), so the SDK's `Torchrun`
distributed config, which wraps an entry script in torchrun, is not used: it would start torchrun inside torchrun.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from tuneloop.cluster.job import job_inputs
from tuneloop.config_file import apply_override
from tuneloop.deploy import TargetOutput
from tuneloop.deploy.bundle import ADAPTERS_DIR
from tuneloop.deploy.context import MODEL_FOLDER, DeployContext
from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.vllm import VLLM_SERVER_MODULE
from tuneloop.train.launch import node_command, shell_join

MODEL_ROOT = "/opt/ml/model"  # where SageMaker puts a model's data in its container
NEEDS_GGUF = False
DEPLOY_SCRIPT = "deploy_endpoint.py"
TRAIN_SCRIPT = "train_job.py"
TRAIN_FOLDER = "train"  # the training job's source_dir: config.yaml (and requirements.txt with the tuneloop wheel)
TRAIN_CONFIG = "config.yaml"
# AWS's vLLM container for SageMaker, as the SDK's image_uris knows it (framework "vllm"; 0.30.0 is the newest in
# sagemaker-core 2.27). Its entrypoint (aws/deep-learning-containers vllm/build_artifacts/sagemaker_entrypoint.sh)
# runs `python3 -m vllm.entrypoints.openai.api_server --port 8080` plus one `--name value` per SM_VLLM_NAME variable.
VLLM_DLC_VERSION = "0.30.0"
VLLM_ENV_PREFIX = "SM_VLLM_"
SAGEMAKER_PORT = 8080  # SageMaker sends /ping and /invocations to 8080
# AWS's PyTorch training container (image_uris framework "pytorch", image_scope "training"), Python 3.12.
PYTORCH_TRAINING_VERSION = "2.8.0"
PYTORCH_PY_VERSION = "py312"
# SageMaker syncs /opt/ml/checkpoints to checkpoint_config.s3_uri while the job runs and restores it on a restart,
# so the workspace (runs, checkpoints, registry) lives there and `--resume` continues a restarted job.
TRAIN_WORKSPACE = "/opt/ml/checkpoints/workspace"
INPUT_ROOT = "/opt/ml/input/data"  # channel NAME is copied to INPUT_ROOT/NAME
# Host memory one model copy reserves on its instance (MinMemoryRequiredInMb): vLLM keeps the weights on the GPUs.
COPY_MEMORY_MB = 8192


def vllm_environment(arguments: list[str]) -> dict[str, str]:
    """vLLM's flags as SM_VLLM_* variables for AWS's entrypoint (`--max-model-len 1024` -> SM_VLLM_MAX_MODEL_LEN=1024,
    `--enable-lora` -> SM_VLLM_ENABLE_LORA= with no value). Refuses what the entrypoint could not give back exactly."""
    environment: dict[str, str] = {}
    index = 0
    while index < len(arguments):
        flag = arguments[index]
        if not flag.startswith("--") or "_" in flag or "=" in flag:
            raise TuneloopError(f"vLLM argument {flag!r} is not a --dashed-flag; SM_VLLM_* variables cannot carry it")
        values: list[str] = []
        index += 1
        while index < len(arguments) and not arguments[index].startswith("--"):
            values.append(arguments[index])
            index += 1
        if len(values) > 1:
            raise TuneloopError(
                f"vLLM flag {flag} has {len(values)} values ({', '.join(values)}); an SM_VLLM_* variable carries one",
                hint="SageMaker serves more adapters as adapter inference components: deploy one adapter per version",
            )
        name = VLLM_ENV_PREFIX + flag[2:].upper().replace("-", "_")
        if name in environment:
            raise TuneloopError(f"vLLM flag {flag} appears twice; an SM_VLLM_* variable carries it once")
        environment[name] = values[0] if values else ""
    return environment


def entrypoint_arguments(environment: dict[str, str]) -> list[str]:
    """What AWS's entrypoint passes vLLM for these variables (its loop, in the variables' order)."""
    arguments: list[str] = []
    for key, value in environment.items():
        if key.startswith(VLLM_ENV_PREFIX):
            arguments.append("--" + key.removeprefix(VLLM_ENV_PREFIX).lower().replace("_", "-"))
            if value:
                arguments.append(value)
    return arguments


def resource_name(text: str, limit: int = 63) -> str:
    """A SageMaker resource name: letters, digits and '-', starting and ending with a letter or digit."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].strip("-")
    if not slug:
        raise TuneloopError(f"{text!r} gives no SageMaker resource name (letters, digits and '-')")
    return slug


def endpoint_name(ctx: DeployContext) -> str:
    """The endpoint is the registry model's (one endpoint across versions: a new champion is a new pair of inference
    components on it); without a registry name, the deployment's."""
    return resource_name(f"tuneloop-{ctx.model.registry_name}" if ctx.model.registry_name else ctx.name)


def model_uri(ctx: DeployContext) -> str | None:
    """Where `model/` is uploaded (None: the SageMaker default bucket, resolved by the script with AWS)."""
    uri = ctx.settings.storage_uri
    if uri is None:
        return None
    if not uri.startswith("s3://"):
        raise TuneloopError(
            f"deploy.storage_uri={uri!r} is not an s3:// URI", hint="SageMaker reads model data from S3"
        )
    return uri.rstrip("/")


def write(ctx: DeployContext) -> TargetOutput:
    arguments = ctx.vllm_arguments(MODEL_ROOT)
    environment = vllm_environment(arguments)
    engine_command = [
        "python3",
        "-m",
        VLLM_SERVER_MODULE,
        "--port",
        str(SAGEMAKER_PORT),
        *entrypoint_arguments(environment),
    ]
    endpoint = endpoint_name(ctx)
    adapters = {
        resource_name(folder): {"served_name": served, "folder": folder}
        for served, folder in ctx.model.adapters.items()
    }
    values: dict[str, Any] = {
        "endpoint_name": endpoint,
        "model_name": resource_name(ctx.name),
        "base_component": resource_name(f"{ctx.name}-base"),
        "adapters_literal": json.dumps(adapters, indent=4),
        "adapter_names": list(adapters),
        "engine_command": engine_command,
        "model_uri_literal": repr(model_uri(ctx)),
        "default_prefix": f"tuneloop/{ctx.name}",
        "role_literal": repr(ctx.settings.sagemaker_role),
        "image_literal": repr(ctx.settings.sagemaker_image_uri),
        "vllm_dlc_version": VLLM_DLC_VERSION,
        "vllm_arguments_literal": json.dumps(arguments, indent=4),
        "engine_command_literal": json.dumps(engine_command, indent=4),
        "model_root": MODEL_ROOT,
        "adapters_dir": ADAPTERS_DIR,
        "model_folder": MODEL_FOLDER,
        "instance_type": ctx.settings.sagemaker_instance_type,
        "replicas": ctx.settings.replicas,
        "min_replicas": ctx.settings.min_replicas,
        "max_replicas": ctx.settings.max_replicas,
        "gpu_count": ctx.settings.gpu_count,
        "target_concurrency": ctx.settings.max_concurrent_requests,
        "copy_memory_mb": COPY_MEMORY_MB,
        "startup_timeout_s": int(max(900, ctx.config.serve.start_timeout_s)),
    }
    ctx.write(DEPLOY_SCRIPT, ctx.render("sagemaker_deploy_endpoint.py.j2", **values), executable=True)
    training = _write_training(ctx, values)
    commands = _commands(ctx, values, training)
    ctx.write("README.md", ctx.render("sagemaker_README.md.j2", commands=commands, training=training, **values))
    return TargetOutput(engine_commands={"gpu": engine_command}, images={}, commands=commands)


def _write_training(ctx: DeployContext, values: dict[str, Any]) -> dict[str, Any]:
    """train/config.yaml (the config with its local files moved to input channels), train/requirements.txt when the
    default image needs the tuneloop wheel, and train_job.py."""
    config = ctx.config.model_dump(mode="json")
    channels: dict[str, dict[str, Any]] = {}  # channel -> {"local": path to upload, "key": the config key}
    for item in job_inputs(ctx.config):
        local = ctx.config.resolve_path(item.path)
        channel = resource_name(item.key.replace(".", "-"), 64)
        channels[channel] = {"local": str(local), "key": item.key, "file": local.name, "folder": local.is_dir()}
        # JSON-quoted: the override parser reads YAML, and a file named `true` or `1e3` must stay a path.
        apply_override(config, f"{item.key}={json.dumps(str(PurePosixPath(INPUT_ROOT) / channel / local.name))}")
    ctx.write(f"{TRAIN_FOLDER}/{TRAIN_CONFIG}", yaml.safe_dump(config, sort_keys=False))
    wheel = None
    if ctx.settings.sagemaker_training_image is None:
        from importlib.metadata import version

        wheel = f"tuneloop-{version('tuneloop')}-py3-none-any.whl"
        ctx.write(f"{TRAIN_FOLDER}/requirements.txt", f"./{wheel}\n")
    command = node_command(
        TRAIN_CONFIG,
        nproc="$SM_NUM_GPUS",
        nnodes="$SM_HOST_COUNT",
        node_rank="$SM_CURRENT_HOST_RANK",
        master_addr="$SM_MASTER_ADDR",
        master_port="$SM_MASTER_PORT",
        run_id="$TRAINING_JOB_NAME",  # set by SageMaker in the container: the same on every host, unique per job
        resume=True,  # a restarted job continues its run from the checkpoints SageMaker restored
    )
    # ModelTrainer splits SourceCode.command on whitespace before the container's shell evaluates it.
    if any(re.search(r"\s", part) for part in command):
        raise TuneloopError(f"the training command has an argument with spaces: {command}")
    training = {
        "job_name": resource_name(f"{ctx.config.project.name}-train", 40),
        "train_instance_type": ctx.settings.sagemaker_training_instance_type,
        "train_instance_count": ctx.settings.sagemaker_training_instance_count,
        "train_image_literal": repr(ctx.settings.sagemaker_training_image),
        "pytorch_version": PYTORCH_TRAINING_VERSION,
        "py_version": PYTORCH_PY_VERSION,
        "node_command": shell_join(command),
        "node_command_literal": json.dumps(shell_join(command)),
        "train_folder": TRAIN_FOLDER,
        "channels": channels,
        "channels_literal": json.dumps({name: spec["file"] for name, spec in channels.items()}, indent=4),
        "workspace": TRAIN_WORKSPACE,
        "wheel": wheel,
    }
    ctx.write(TRAIN_SCRIPT, ctx.render("sagemaker_train_job.py.j2", **values, **training), executable=True)
    return training


def _commands(ctx: DeployContext, values: dict[str, Any], training: dict[str, Any]) -> dict[str, str]:
    upload = ['MODEL_URI="$(python deploy_endpoint.py --print-model-uri)"', 'aws s3 sync model/ "$MODEL_URI/model/"']
    for folder in ctx.model.adapters.values():
        upload.append(f"tar -czf {folder}.tar.gz -C model/{ADAPTERS_DIR}/{folder} .")
        upload.append(f'aws s3 cp {folder}.tar.gz "$MODEL_URI/{ADAPTERS_DIR}/{folder}.tar.gz"')
    registry = ctx.model.registry_name or "NAME"
    adapter_component = values["adapter_names"][0]
    scalable = (
        f"aws application-autoscaling register-scalable-target --service-namespace sagemaker "
        f"--resource-id inference-component/{values['base_component']} "
        f"--scalable-dimension sagemaker:inference-component:DesiredCopyCount "
        f"--min-capacity {ctx.settings.min_replicas} --max-capacity {ctx.settings.max_replicas}"
    )
    train_upload = ['TRAIN_URI="$(python train_job.py --print-storage-uri)"']
    for channel, spec in training["channels"].items():
        verb, suffix = ("sync", "/") if spec["folder"] else ("cp", "")
        train_upload.append(f'aws s3 {verb} {spec["local"]} "$TRAIN_URI/inputs/{channel}/{spec["file"]}{suffix}"')
    if training["wheel"]:
        train_upload.insert(0, "pip wheel --no-deps --wheel-dir train/ PATH/TO/tuneloop  # the tuneloop checkout")
    return {
        "check": "python deploy_endpoint.py --dry-run",
        "upload": "\n".join(upload),
        "deploy": "python deploy_endpoint.py",
        "call": f'python deploy_endpoint.py --invoke "Hello" --component {adapter_component}',
        "rollforward": f"tuneloop deploy sagemaker {registry}@champion -c CONFIG --out NEW_FOLDER\n"
        "(cd NEW_FOLDER && python deploy_endpoint.py)  # then send traffic to its adapter component\n"
        "python deploy_endpoint.py --delete  # here: the old version's components and model",
        "rollback": f"tuneloop deploy sagemaker {registry}@previous -c CONFIG --out PREVIOUS_FOLDER\n"
        "(cd PREVIOUS_FOLDER && python deploy_endpoint.py)\n"
        "python deploy_endpoint.py --delete  # here: the version rolled back from",
        "scale": scalable,
        "delete": "python deploy_endpoint.py --delete --delete-endpoint",
        "train_upload": "\n".join(train_upload),
        "train": "python train_job.py",
        "cost": "tuneloop cost --platform sagemaker",
    }
