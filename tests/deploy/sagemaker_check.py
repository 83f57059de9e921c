"""Build the SageMaker SDK v3 objects a generated `tuneloop deploy sagemaker` folder describes, with the real
`sagemaker` package (run in .venv-deploy), and check them against deploy.json; print what was built as JSON.

No AWS call can happen: every network connection is refused (and recorded), the credentials are fake, and the
scripts are driven through their build-only functions with an explicit role and S3 URI (the SDK's IAM role
validation is off, SAGEMAKER_VALIDATE_ROLE=false, as the scripts' --dry-run sets it). What is checked:

- deploy_endpoint.py: ModelBuilder's image (AWS's vLLM image for SageMaker from the SDK's own image table), its
  variables, read back through AWS's entrypoint loop (run in bash) into vLLM's command line, which must equal
  deploy.json's engine_commands["gpu"]; instance type, role and the uncompressed S3 model data. The container
  definition ModelBuilder would send (the SDK's container_def), the base component's compute requirements, each
  adapter component's CreateInferenceComponent request (from sagemaker-core's shapes) and the autoscaling requests
  are validated against botocore's own API models (what boto3 checks before sending).
- train_job.py: ModelTrainer's image, compute, channels, checkpoint config, environment and command; the training
  script the SDK writes for the container (ModelTrainer._prepare_train_script) run in bash with SageMaker's
  variables for host 2 of 2, giving the `tuneloop train` arguments.

    .venv-deploy/bin/python tests/deploy/sagemaker_check.py DEPLOY_FOLDER
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from offline import load, refuse_network

connections = refuse_network("tests/deploy/sagemaker_check.py")

REGION = "us-east-1"
ROLE = "arn:aws:iam::111122223333:role/tuneloop-check"
BUCKET_URI = "s3://tuneloop-check-bucket/tuneloop/check"
os.environ.update(
    {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE",
        "AWS_SECRET_ACCESS_KEY": "fake/fake/fake",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials or region
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "SAGEMAKER_VALIDATE_ROLE": "false",
    }
)
# AWS's entrypoint loop for the vLLM image (aws/deep-learning-containers vllm/build_artifacts/
# sagemaker_entrypoint.sh), printing vLLM's arguments one per line instead of starting it.
ENTRYPOINT_LOOP = r"""
PREFIX="SM_VLLM_"
ARG_PREFIX="--"
ARGS=(--port 8080)
while IFS='=' read -r key value; do
    arg_name=$(echo "${key#"${PREFIX}"}" | tr '[:upper:]' '[:lower:]' | tr '_' '-')
    ARGS+=("${ARG_PREFIX}${arg_name}")
    if [ -n "$value" ]; then
        ARGS+=("$value")
    fi
done < <(env | grep "^${PREFIX}")
printf '%s\n' python3 -m vllm.entrypoints.openai.api_server "${ARGS[@]}"
"""


def flag_values(command: list[str]) -> dict[str, str]:
    """`--flag value` / bare `--flag` pairs after the program (the order env prints variables in is not fixed)."""
    pairs: dict[str, str] = {}
    index = 3  # python3 -m MODULE
    while index < len(command):
        flag, index = command[index], index + 1
        assert flag.startswith("--"), f"not a flag: {flag!r} in {command}"
        assert flag not in pairs, f"{flag} twice in {command}"
        value = ""
        if index < len(command) and not command[index].startswith("--"):
            value, index = command[index], index + 1
        pairs[flag] = value
    return pairs


def validate(service: str, operation: str, params: dict[str, Any]) -> None:
    """boto3's own parameter validation for `operation`, from botocore's API model (no request is sent)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    report = ParamValidator().validate(params, model.input_shape)
    assert not report.has_errors(), f"{service} {operation}: {report.generate_report()}"


def check_endpoint(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    from sagemaker.core.helper.session_helper import container_def
    from sagemaker.core.utils.utils import serialize

    script = load(folder / "deploy_endpoint.py")
    session = script.sagemaker_session(script.boto_session())
    objects = script.build(session, ROLE, BUCKET_URI)
    builder = objects["model_builder"]

    assert builder.image_uri.startswith(f"763104351884.dkr.ecr.{REGION}.amazonaws.com/vllm:")
    assert builder.image_uri.endswith("-sagemaker"), builder.image_uri
    assert builder.instance_type == manifest["settings"]["sagemaker_instance_type"]
    assert builder.role_arn == ROLE and builder.region == REGION
    assert builder.s3_model_data_url == {
        "S3DataSource": {"S3Uri": f"{BUCKET_URI}/model/", "S3DataType": "S3Prefix", "CompressionType": "None"}
    }
    assert builder.env_vars["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    entrypoint = subprocess.run(
        ["bash", "-c", ENTRYPOINT_LOOP],
        env={"PATH": os.environ["PATH"], **builder.env_vars},
        capture_output=True,
        text=True,
        check=True,
    )
    served = entrypoint.stdout.splitlines()
    expected = manifest["engine_commands"]["gpu"]
    assert served[:3] == expected[:3], (served, expected)
    assert flag_values(served) == flag_values(expected), (served, expected)
    assert expected == script.ENGINE_COMMAND

    container = container_def(builder.image_uri, builder.s3_model_data_url, builder.env_vars)
    validate("sagemaker", "CreateModel", {"ModelName": script.MODEL_NAME, "PrimaryContainer": container})
    requirements = objects["resources"].get_compute_resource_requirements()
    assert requirements["NumberOfAcceleratorDevicesRequired"] == manifest["settings"]["gpu_count"]
    base_request = {
        "InferenceComponentName": script.BASE_COMPONENT,
        "EndpointName": script.ENDPOINT_NAME,
        "VariantName": "AllTraffic",
        "Specification": {"ModelName": script.MODEL_NAME, "ComputeResourceRequirements": requirements},
        "RuntimeConfig": {"CopyCount": objects["resources"].copy_count},
    }
    validate("sagemaker", "CreateInferenceComponent", base_request)
    adapters = {}
    for name, specification in objects["adapters"].items():
        request = serialize(specification)
        assert request["BaseInferenceComponentName"] == script.BASE_COMPONENT
        folder_name = script.ADAPTER_COMPONENTS[name]["folder"]
        assert request["Container"]["ArtifactUrl"] == f"{BUCKET_URI}/adapters/{folder_name}.tar.gz"
        validate(
            "sagemaker",
            "CreateInferenceComponent",
            {"InferenceComponentName": name, "EndpointName": script.ENDPOINT_NAME, "Specification": request},
        )
        adapters[name] = request
    validate("application-autoscaling", "RegisterScalableTarget", objects["scalable_target"])
    validate("application-autoscaling", "PutScalingPolicy", objects["scaling_policy"])
    return {
        "image": builder.image_uri,
        "instance_type": builder.instance_type,
        "instance_count": script.INITIAL_INSTANCE_COUNT,
        "environment": builder.env_vars,
        "served_command": served,
        "base_component": base_request,
        "adapters": adapters,
        "scalable_target": objects["scalable_target"],
    }


def check_training(folder: Path) -> dict[str, Any]:
    script = load(folder / "train_job.py")
    session = script.sagemaker_session()
    trainer = script.model_trainer(session, ROLE, f"{BUCKET_URI}/train")
    assert trainer.distributed is None  # `tuneloop train` is the torchrun launcher
    assert trainer.role == ROLE and trainer.source_code.command == script.NODE_COMMAND
    assert trainer.checkpoint_config.s3_uri == f"{BUCKET_URI}/train/checkpoints"
    assert trainer.environment["TUNELOOP_HOME"].startswith(trainer.checkpoint_config.local_path)
    with tempfile.TemporaryDirectory() as scratch:
        holder = tempfile.TemporaryDirectory(dir=scratch)
        trainer._prepare_train_script(holder, trainer.source_code, trainer.distributed)
        train_script = (Path(holder.name) / "sm_train.sh").read_text()
    # The part of the SDK's container script that runs the command, with `tuneloop` printing its arguments and
    # SageMaker's variables for the second of two hosts with 4 GPUs each.
    run_part = train_script[train_script.index("CMD=$(cat") : train_script.index('eval "$CMD"') + len('eval "$CMD"')]
    host_variables = {
        "SM_NUM_GPUS": "4",
        "SM_HOST_COUNT": "2",
        "SM_HOSTS": '["algo-1", "algo-2"]',
        "SM_CURRENT_HOST": "algo-2",
        "SM_CURRENT_HOST_RANK": "1",
        "SM_MASTER_ADDR": "algo-1",
        "SM_MASTER_PORT": "7777",
        "TRAINING_JOB_NAME": "check-job-1",
    }
    ran = subprocess.run(
        ["bash", "-c", "tuneloop() { printf '%s\\n' \"$@\"; }\n" + run_part],
        env={"PATH": os.environ["PATH"], **host_variables},
        capture_output=True,
        text=True,
        check=True,
    )
    arguments = [line for line in ran.stdout.splitlines() if not line.startswith("Executing command: ")]
    return {
        "image": trainer.training_image,
        "instance_type": trainer.compute.instance_type,
        "instance_count": trainer.compute.instance_count,
        "channels": {item.channel_name: item.data_source for item in trainer.input_data_config or []},
        "requirements": trainer.source_code.requirements,
        "command": trainer.source_code.command,
        "tuneloop_arguments": arguments,
    }


def main(folder: Path) -> dict[str, Any]:
    with contextlib.suppress(ConnectionRefusedError):  # the guard works: a connection is refused and recorded
        socket.create_connection(("sagemaker.us-east-1.amazonaws.com", 443))
    assert connections, "the network guard did not record a connection"
    connections.clear()
    manifest = json.loads((folder / "deploy.json").read_text())
    manifest["settings"] = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result = {"endpoint": check_endpoint(folder, manifest), "training": check_training(folder)}
    assert not connections, f"network calls attempted: {connections}"
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2, default=str))
