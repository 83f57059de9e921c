"""`tuneloop deploy docker` from a real registry version: the Dockerfile passes hadolint, compose.yaml passes the
Compose Specification (compose-spec's validating parser), and the images' entrypoints, run here without Docker
(the CPU engine image's llama-server command and the gateway image's `tuneloop serve`), answer chat requests from
the official openai client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY_PYTHON, LLAMA_SERVER, REFERENCE
from tests.serve.servers import log_tail
from tuneloop.net import free_port, wait_until_ready

DEPLOY_BIN = DEPLOY_PYTHON.parent


def tools_installed() -> None:
    assert DEPLOY_PYTHON.exists(), "the deploy tools are missing: run `make deploy-tools`"


def entrypoints(dockerfile: str) -> dict[str, list[str]]:
    """Each build stage's ENTRYPOINT (exec form) by stage name."""
    found, stage = {}, None
    for line in dockerfile.splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)", line):
            stage = match[1]
        elif line.startswith("ENTRYPOINT ") and stage:
            found[stage] = json.loads(line.removeprefix("ENTRYPOINT "))
    return found


@pytest.mark.slow
def test_docker_folder_lints_and_matches_the_engine_commands(deploy_folder) -> None:
    tools_installed()
    out, manifest = deploy_folder("docker")
    for name in ("Dockerfile", "compose.yaml", "README.md", "gateway/gateway-cpu.yaml", "monitoring/prometheus.yml"):
        assert name in manifest.files and (out / name).exists(), name
    assert (out / "model" / "gguf" / "base.gguf").exists() and (out / "gateway" / "source" / "pyproject.toml").exists()

    lint = subprocess.run(
        [DEPLOY_BIN / "hadolint", "--config", out / ".hadolint.yaml", out / "Dockerfile"],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The lint is real: a Dockerfile with a classic mistake fails it.
    (out / "Bad.Dockerfile").write_text("FROM debian:bookworm-slim\nRUN cd /tmp && apt-get install curl\n")
    bad = subprocess.run([DEPLOY_BIN / "hadolint", out / "Bad.Dockerfile"], capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3003" in bad.stdout

    checked = subprocess.run(
        [DEPLOY_PYTHON, "-c", COMPOSE_CHECK, out / "compose.yaml"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout) == {
        "engine-gpu": ["gpu"],
        "engine-cpu": ["cpu"],
        "gateway-gpu": ["gpu"],
        "gateway-cpu": ["cpu"],
        "prometheus": ["cpu", "gpu"],
        "grafana": ["cpu", "gpu"],
    }

    stages = entrypoints((out / "Dockerfile").read_text())
    assert stages["gpu"] == manifest.engine_commands["gpu"] and stages["cpu"] == manifest.engine_commands["cpu"]
    assert stages["gateway"][:2] == ["tuneloop", "serve"]
    gateway = yaml.safe_load((out / "gateway" / "gateway-cpu.yaml").read_text())["serve"]
    assert gateway["remote_llamacpp_adapters"] == [REFERENCE] and gateway["engine"] == "remote"


# YAML merge keys (`<<: *engine`) are resolved by the YAML loader, as Compose does, before the spec check (the
# checker's own parser does not know them).
COMPOSE_CHECK = """
import json, sys
import compose_spec, yaml
spec = compose_spec.PyCompose.from_json(json.dumps(yaml.safe_load(open(sys.argv[1])))).to_spec()
print(json.dumps({name: sorted(service.profiles) for name, service in spec.services.items()}))
"""


def local_command(command: list[str], out: Path, port: int) -> list[str]:
    """An image's engine command as run here: the model folder for /models, this machine's llama-server, 127.0.0.1."""
    local = [part.replace("/models/", f"{out / 'model'}/") for part in command]
    local[0] = str(LLAMA_SERVER)
    local[local.index("--host") + 1] = "127.0.0.1"
    local[local.index("--port") + 1] = str(port)
    return local


@pytest.mark.slow
def test_cpu_image_entrypoints_answer_through_the_gateway(deploy_folder, tmp_path: Path) -> None:
    """The CPU image's engine command and the gateway image's command, run without Docker, answer the openai client
    for the adapter and the base; the gateway enforces the API key."""
    assert LLAMA_SERVER.exists(), "llama-server is missing: run `make llamacpp`"
    from openai import AuthenticationError, OpenAI

    out, manifest = deploy_folder("docker")
    engine_port, gateway_port = free_port(), free_port()
    engine_log, gateway_log = tmp_path / "engine.log", tmp_path / "gateway.log"
    with engine_log.open("w") as log:
        engine = subprocess.Popen(
            local_command(manifest.engine_commands["cpu"], out, engine_port), stdout=log, stderr=subprocess.STDOUT
        )
    gateway = None
    try:
        assert wait_until_ready(f"http://127.0.0.1:{engine_port}", engine, 300, path="/health") == "ready", log_tail(
            engine_log
        )
        with gateway_log.open("w") as log:
            gateway = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tuneloop.cli",
                    "serve",
                    "--engine",
                    "remote",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(gateway_port),
                    "-c",
                    str(out / "gateway" / "gateway-cpu.yaml"),
                    "--set",
                    f"serve.remote_urls=[http://127.0.0.1:{engine_port}/v1]",
                ],
                env={**os.environ, "TUNELOOP_API_KEYS": "deploy-key", "TUNELOOP_HOME": str(tmp_path / "gateway-ws")},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{gateway_port}"
        assert wait_until_ready(url, gateway, 120) == "ready", log_tail(gateway_log)
        client = OpenAI(base_url=f"{url}/v1", api_key="deploy-key", max_retries=0)
        served = {model.id for model in client.models.list().data}
        assert served == {manifest.model.base_model, REFERENCE}
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answers = {
            name: client.chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0)
            for name in served
        }
        for answer in answers.values():
            assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content
        assert "Paris" in answers[manifest.model.base_model].choices[0].message.content
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        for process in (gateway, engine):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
