"""`tuneloop deploy sagemaker` from a real registry version: the generated SageMaker SDK v3 scripts build their
ModelBuilder, inference component shapes, autoscaling requests and ModelTrainer with the real `sagemaker` package,
with no AWS call (tests/deploy/sagemaker_check.py, run in .venv-deploy), and vLLM receives exactly the flags
`tuneloop serve` builds for the same version."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY_PYTHON, serve_flags
from tuneloop.config import LoopConfig
from tuneloop.deploy.sagemaker import MODEL_ROOT, vllm_environment
from tuneloop.errors import TuneloopError

CHECKER = Path(__file__).with_name("sagemaker_check.py")
SETTINGS = {"sagemaker_instance_type": "ml.g5.12xlarge", "gpu_count": 2}


def run_checker(out: Path) -> subprocess.CompletedProcess[str]:
    assert DEPLOY_PYTHON.exists(), "the deploy tools are missing: run `make deploy-tools`"
    return subprocess.run(
        [DEPLOY_PYTHON, CHECKER, out, json.dumps(SETTINGS)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_sagemaker_scripts_build_with_the_sdk_and_serve_the_engine_flags(deploy_folder, registered_version) -> None:
    out, manifest = deploy_folder(
        "sagemaker",
        "--set",
        f"deploy.sagemaker_instance_type={SETTINGS['sagemaker_instance_type']}",
        "--set",
        f"deploy.gpu_count={SETTINGS['gpu_count']}",
        "--set",
        "deploy.sagemaker_training_instance_count=2",
        "--min-replicas",
        "1",
        "--max-replicas",
        "4",
    )
    for name in ("deploy_endpoint.py", "train_job.py", "train/config.yaml", "train/requirements.txt", "README.md"):
        assert name in manifest.files and (out / name).exists(), name
    assert manifest.model_root == MODEL_ROOT == "/opt/ml/model" and manifest.images == {}

    # Golden: the flags vLLM gets in the container are serve's own for this version (plus SageMaker's port 8080).
    config = LoopConfig.model_validate(yaml.safe_load(registered_version.config.read_text()))
    ((served, folder),) = manifest.model.adapters.items()
    expected = [*serve_flags(registered_version, out, manifest), "--tensor-parallel-size", "2"]
    gpu = manifest.engine_commands["gpu"]
    assert gpu[:5] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--port", "8080"]
    assert gpu[5:] == expected
    assert f"{served}=/opt/ml/model/adapters/{folder}" in gpu

    checked = run_checker(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    built = json.loads(checked.stdout)
    endpoint, training = built["endpoint"], built["training"]
    assert endpoint["image"].startswith("763104351884.dkr.ecr.us-east-1.amazonaws.com/vllm:0.30.0-gpu-py312-")
    assert endpoint["instance_type"] == "ml.g5.12xlarge"
    assert endpoint["scalable_target"]["MinCapacity"] == 1 and endpoint["scalable_target"]["MaxCapacity"] == 4
    assert (
        endpoint["base_component"]["Specification"]["ComputeResourceRequirements"]["NumberOfAcceleratorDevicesRequired"]
        == 2
    )
    (adapter,) = endpoint["adapters"].values()
    assert adapter["BaseInferenceComponentName"] == endpoint["base_component"]["InferenceComponentName"]

    assert training["image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"
    assert training["instance_type"] == "ml.g5.12xlarge" and training["instance_count"] == 2
    assert training["requirements"] == "requirements.txt" and training["channels"] == {}  # builtin data only
    assert training["tuneloop_arguments"] == [
        "train", "-c", "config.yaml", "--nproc", "4", "--nnodes", "2", "--node-rank", "1",
        "--master-addr", "algo-1", "--master-port", "7777", "--run-id", "check-job-1", "--resume",
    ]  # fmt: skip
    copied = LoopConfig.model_validate(yaml.safe_load((out / "train" / "config.yaml").read_text()))
    # The training config is the version's (the command's --set deploy.* overrides aside).
    assert copied.model_dump(exclude={"deploy"}) == config.model_dump(exclude={"deploy"})

    readme = (out / "README.md").read_text()
    for step in ("upload", "deploy", "call", "rollback", "scale", "cost"):
        assert manifest.commands[step] in readme, step
    assert "tuneloop cost --platform sagemaker" in readme

    # The checker fails on what the SDK would refuse: a misspelt shape field (sagemaker-core's pydantic shapes
    # forbid unknown fields) and an engine flag that no longer matches deploy.json.
    script = out / "deploy_endpoint.py"
    good = script.read_text()
    script.write_text(good.replace("base_inference_component_name=", "base_inference_component_nam="))
    typo = run_checker(out)
    assert typo.returncode != 0 and "base_inference_component_nam" in typo.stderr and "extra_forbidden" in typo.stderr
    script.write_text(good.replace('"--max-model-len",\n    "1024"', '"--max-model-len",\n    "2048"'))
    assert good != script.read_text()
    drifted = run_checker(out)
    assert drifted.returncode != 0 and "AssertionError" in drifted.stderr
    script.write_text(good)


def test_sm_vllm_variables_refuse_what_the_entrypoint_cannot_carry() -> None:
    assert vllm_environment(["--model", "/opt/ml/model/base", "--enable-lora", "--max-loras", "1"]) == {
        "SM_VLLM_MODEL": "/opt/ml/model/base",
        "SM_VLLM_ENABLE_LORA": "",
        "SM_VLLM_MAX_LORAS": "1",
    }
    with pytest.raises(TuneloopError, match="--lora-modules has 2 values"):
        vllm_environment(["--lora-modules", "a=/x", "b=/y"])
    with pytest.raises(TuneloopError, match="not a --dashed-flag"):
        vllm_environment(["--max_loras", "1"])
