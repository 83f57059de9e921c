"""A real registry version to deploy: SmolLM2-135M (the bundled base) with a LoRA trained for two steps by
`tuneloop train`, registered as `extractor` version 1 and promoted to champion, once per test session. Deploy
folders are generated from it with the real CLI (`deploy_folder`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.artifacts.deployment import DeployManifest
from tuneloop.cli import app

REPO = Path(__file__).resolve().parents[2]
DEPLOY_PYTHON = REPO / ".venv-deploy" / "bin" / "python"  # `make deploy-tools`: modal, runpod, sagemaker, hadolint
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"  # `make deploy-tools`: the KServe SDK (its own pins)
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
MODEL_NAME = "extractor"
REFERENCE = f"{MODEL_NAME}@champion"

runner = CliRunner()


@dataclass(frozen=True)
class Version:
    config: Path  # the loop config the version was trained with
    workspace: Path


def cli(*args: str, workspace: Path) -> dict:
    result = runner.invoke(app, [*args, "--json"], env={"TUNELOOP_HOME": str(workspace)})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def registered_version(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Version:
    root = tmp_path_factory.mktemp("deploy-version")
    workspace = root / "ws"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "smollm2-135m-instruct").symlink_to(smollm2_folder)
    config = {
        "project": {"name": "deploy-test"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {
            "sources": [{"path": "builtin:extraction", "num_rows": 40}],
            "max_seq_len": 256,
            "packing": True,
            "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
        },
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "save_every": 2, "report_to": []},
        "registry": {"name": MODEL_NAME},
        "serve": {"llamacpp_quant": "f16", "llamacpp_parallel": 2, "max_model_len": 1024},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli("train", "-c", str(path), workspace=workspace)
    cli("registry", "alias", MODEL_NAME, "1", "champion", "-c", str(path), workspace=workspace)
    return Version(path, workspace)


@pytest.fixture
def deploy_folder(registered_version: Version, tmp_path: Path) -> Callable[..., tuple[Path, DeployManifest]]:
    """`tuneloop deploy TARGET extractor@champion` into a fresh folder; extra CLI arguments pass through."""

    def make(target: str, *extra: str, reference: str = REFERENCE) -> tuple[Path, DeployManifest]:
        out = tmp_path / f"deploy-{target}"
        summary = cli(
            "deploy",
            target,
            reference,
            "-c",
            str(registered_version.config),
            "--out",
            str(out),
            *extra,
            workspace=registered_version.workspace,
        )
        assert summary["target"] == target
        return out, DeployManifest.load(out / "deploy.json")

    return make


def serve_flags(version: Version, out: Path, manifest: DeployManifest) -> list[str]:
    """The vLLM flags `tuneloop serve`'s engine builds for a deploy folder's bundled files, with the folders as the
    deployment's containers see them (manifest.model_root): what every GPU target's engine must run."""
    from tuneloop.config_file import load_config
    from tuneloop.serve.engines.precision import vllm_dtype
    from tuneloop.serve.engines.vllm import VllmEngine

    config = load_config(version.config, None)
    model = out / "model"
    engine = VllmEngine(
        config.serve,
        manifest.model.base_model,
        model / "base",
        {name: model / "adapters" / folder for name, folder in manifest.model.adapters.items()},
        python=Path("python3"),
        max_model_len=config.serve.max_model_len,
        log_file=None,
        zero_lora_dir=None,
    )
    local = engine.command(8000)
    flags = [part.replace(str(model), manifest.model_root) for part in local[3 : local.index("--host")]]
    # The one intended difference: `tuneloop serve` resolves `precision: auto` for this machine's CPU, a deploy
    # leaves it to the image's GPU (serve/engines/precision.py).
    flags[flags.index("--dtype") + 1] = vllm_dtype(config.serve, for_this_machine=False)
    return flags


def deploy_fails(version: Version, tmp_path: Path, *arguments: str) -> str:
    """`tuneloop deploy ARGUMENTS` with the version's config, expected to fail: its output."""
    result = runner.invoke(
        app,
        ["deploy", *arguments, "-c", str(version.config), "--out", str(tmp_path / "out")],
        env={"TUNELOOP_HOME": str(version.workspace)},
    )
    assert result.exit_code != 0, result.output
    return result.output
