"""`tuneloop deploy modal` from a real registry version: the generated module imported with the real `modal` package
(.venv-deploy, no Modal account, no network), and what Modal built from it read back (modal_check.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.deploy.conftest import DEPLOY_PYTHON, REFERENCE, REPO, Version, deploy_fails, serve_flags
from tuneloop.config_file import load_config

CHECK = Path(__file__).with_name("modal_check.py")


def modal_objects(app_file: Path, home: Path) -> dict:
    if not DEPLOY_PYTHON.exists():
        pytest.fail(f"{DEPLOY_PYTHON} is missing: run `make deploy-tools`")
    home.mkdir(exist_ok=True)  # no ~/.modal.toml: no token, no workspace
    result = subprocess.run(
        [str(DEPLOY_PYTHON), str(CHECK), str(app_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_modal_module_builds_what_the_config_asks(deploy_folder, registered_version: Version, tmp_path: Path) -> None:
    out, manifest = deploy_folder(
        "modal",
        "--gpu",
        "H100",
        "--min-replicas",
        "0",
        "--max-replicas",
        "5",
        "--set",
        "deploy.max_concurrent_requests=12",
        "--set",
        "deploy.scaledown_window_s=120",
        "--set",
        "deploy.api_key_secret=extractor-keys",
    )
    assert manifest.target == "modal" and manifest.model_root == "/models" and manifest.images == {}
    assert {"modal_app.py", "README.md", "deploy.json"} <= set(manifest.files)
    built = modal_objects(out / "modal_app.py", tmp_path / "home")

    assert built["connections"] == []  # importing and building the objects did not touch the network
    assert built["app_name"] == "extractor" and built["functions"] == ["serve"] and built["web_endpoints"] == ["serve"]
    assert built["gpus"] == [["H100", 1]]
    assert built["volumes"] == {
        "/models": {"name": "tuneloop-models", "read_only": True, "sub_path": f"/{manifest.name}"}
    }
    assert built["max_inputs"] == 12
    assert built["web_server"]["is_web_server"] and built["web_server"]["port"] == 8000
    assert built["web_server"]["startup_timeout"] >= 600
    assert built["autoscaler"] == {"min_containers": 0, "max_containers": 5, "scaledown_window": 120}
    assert built["secrets"] == ["modal.Secret.from_name('extractor-keys')"]
    assert built["image"][0] == f"FROM {load_config(registered_version.config, None).deploy.vllm_image}"
    assert "ENTRYPOINT []" in built["image"]  # vLLM's `vllm serve` entrypoint would swallow Modal's

    # The container starts exactly the manifest's command, which is `tuneloop serve`'s for the same files.
    gpu_command = manifest.engine_commands["gpu"]
    assert built["started_commands"] == [gpu_command]
    assert gpu_command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert gpu_command[3 : gpu_command.index("--host")] == serve_flags(registered_version, out, manifest)
    assert "--api-key" not in gpu_command  # vLLM reads VLLM_API_KEY from the Secret
    # Every path the command names exists in model/, which `modal volume put ... model /NAME-vN` uploads to the
    # folder the function mounts at /models.
    paths = [part.split("=", 1)[-1] for part in gpu_command if part.split("=", 1)[-1].startswith("/models/")]
    assert paths and all((out / "model" / PurePosixPath(path).relative_to("/models")).exists() for path in paths)

    readme = (out / "README.md").read_text()
    for step in ("upload", "deploy", "rollback", "scale", "secret"):
        assert manifest.commands[step].splitlines()[-1].split("  #")[0] in readme
    assert f"modal volume put tuneloop-models model /{manifest.name}" in manifest.commands["upload"]
    assert 'model="extractor@champion"' in readme and "tuneloop cost --platform modal" in readme
    lint = subprocess.run(
        [str(REPO / ".venv" / "bin" / "ruff"), "check", "--isolated", "--no-cache", str(out / "modal_app.py")],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout


def test_modal_multi_gpu_and_a_gpu_modal_lacks(deploy_folder, registered_version: Version, tmp_path: Path) -> None:
    out, manifest = deploy_folder("modal", "--gpu", "a100-80gb", "--set", "deploy.gpu_count=2")
    built = modal_objects(out / "modal_app.py", tmp_path / "home")
    assert built["gpus"] == [["A100-80GB", 2]]
    command = manifest.engine_commands["gpu"]
    assert command[command.index("--tensor-parallel-size") + 1] == "2"

    output = deploy_fails(registered_version, tmp_path, "modal", REFERENCE, "--gpu", "AMPERE_24")
    assert "deploy.gpu" in output and "AMPERE_24" in output
