"""`tuneloop deploy runpod` from a real registry version: the worker checked with the real `runpod` SDK
(runpod_check.py in .venv-deploy), its Dockerfile with hadolint, and the generated handler.py run in runpod's local
test mode (`--test_input`) against vLLM's CPU build started with the manifest's GPU command line."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import DEPLOY_PYTHON, REFERENCE, REPO, Version, deploy_fails, serve_flags
from tuneloop.config_file import load_config
from tuneloop.serve.engines.vllm import default_vllm_python

CHECK = Path(__file__).with_name("runpod_check.py")
HADOLINT = REPO / ".venv-deploy" / "bin" / "hadolint"
FIELD_IN_ERROR = {  # bad job input (runpod_check.BAD_INPUTS) -> the field its error names
    "not_an_object": "input must be a JSON object",
    "no_known_field": "messages",
    "empty_messages": "input.messages",
    "message_without_role": "input.messages[0]",
    "bad_sampling_params": "input.sampling_params",
    "bad_stream": "input.stream",
    "bad_openai_route": "input.openai_route",
    "bad_openai_input": "input.openai_input",
}
VARIABLE_IN_ERROR = {  # bad endpoint env (runpod_check.BAD_ENVIRONMENTS) -> the variable its error names
    "max_model_len_not_a_number": "MAX_MODEL_LEN",
    "max_loras_zero": "MAX_LORAS",
    "lora_modules_not_json": "LORA_MODULES",
    "lora_modules_without_path": "LORA_MODULES[0]",
}


def deploy_python() -> str:
    if not DEPLOY_PYTHON.exists():
        pytest.fail(f"{DEPLOY_PYTHON} is missing: run `make deploy-tools`")
    return str(DEPLOY_PYTHON)


def test_runpod_worker_endpoint_and_image(deploy_folder, registered_version: Version) -> None:
    out, manifest = deploy_folder(
        "runpod",
        "--gpu",
        "H100",
        "--min-replicas",
        "0",
        "--max-replicas",
        "4",
        "--set",
        "deploy.scaledown_window_s=90",
        "--set",
        "deploy.image_repository=ghcr.io/acme",
    )
    assert manifest.target == "runpod" and manifest.model_root == "/models"
    image = "ghcr.io/acme/extractor:v1-worker"  # one repository per model, a tag per version
    assert manifest.images == {"worker": image}
    assert {"handler.py", "Dockerfile", "endpoint.json", "create_endpoint.py", "README.md"} <= set(manifest.files)

    checked = subprocess.run(
        [deploy_python(), str(CHECK), str(out)], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin"}
    )
    assert checked.returncode == 0, checked.stderr
    found = json.loads(checked.stdout)

    # The worker starts the manifest's command, as endpoint.json's env leaves it; it is `tuneloop serve`'s.
    gpu_command = manifest.engine_commands["gpu"]
    assert found["engine_command"] == gpu_command == found["engine_command_without_env"]
    assert gpu_command[3 : gpu_command.index("--host")] == serve_flags(registered_version, out, manifest)
    assert gpu_command[gpu_command.index("--host") + 1] == "127.0.0.1"  # reached through the handler only
    changed = found["engine_command_changed_on_the_endpoint"]
    assert changed[changed.index("--max-model-len") + 1] == "4096"
    assert changed[changed.index("--lora-modules") + 1 : changed.index("--host")] == ["other=/models/adapters/other"]
    assert found["served_model"] == "extractor@champion"

    # A bad job input fails the job with one error naming the field; so does a bad endpoint variable.
    for name, field in FIELD_IN_ERROR.items():
        parts = found["input_errors"][name]
        assert len(parts) == 1 and field in parts[0]["error"], (name, parts)
    for name, variable in VARIABLE_IN_ERROR.items():
        assert variable in (found["environment_errors"][name] or ""), (name, found["environment_errors"][name])
    assert found["good_input"][2]["model"] == "extractor@champion"
    assert found["openai_input"][:2] == ["/v1/chat/completions", "POST"]

    # endpoint.json as the runpod SDK takes it (its keys bound to create_template/create_endpoint in the check).
    spec = json.loads((out / "endpoint.json").read_text())
    assert spec["template"]["image_name"] == image and spec["template"]["is_serverless"] is True
    assert spec["endpoint"]["gpu_ids"] == "ADA_80_PRO"  # the H100 pool
    assert (spec["endpoint"]["workers_min"], spec["endpoint"]["workers_max"]) == (0, 4)
    assert spec["endpoint"]["idle_timeout"] == 90
    env = spec["template"]["env"]
    assert json.loads(env["LORA_MODULES"]) == [
        {"name": name, "path": f"/models/adapters/{folder}"} for name, folder in manifest.model.adapters.items()
    ]
    # The SDK's own GraphQL mutation, parsed, carries the env unchanged (create_endpoint.py escapes the quotes
    # runpod 1.12 leaves raw: without it the mutation does not parse).
    assert found["template_env_from_mutation"] == env
    assert found["unescaped_template_mutation_error"]

    ruff = [
        str(REPO / ".venv" / "bin" / "ruff"),
        "check",
        "--isolated",
        "--no-cache",
        "handler.py",
        "create_endpoint.py",
    ]
    python_lint = subprocess.run(ruff, cwd=out, capture_output=True, text=True)
    assert python_lint.returncode == 0, python_lint.stdout
    lint = subprocess.run([str(HADOLINT), "Dockerfile"], cwd=out, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr
    dockerfile = (out / "Dockerfile").read_text().splitlines()
    vllm_image = load_config(registered_version.config, None).deploy.vllm_image
    assert f"FROM {vllm_image}" in dockerfile and "COPY model/ /models/" in dockerfile
    assert dockerfile[-1] == 'ENTRYPOINT ["python3", "/worker/handler.py"]'

    readme = (out / "README.md").read_text()
    for step in ("test", "build", "push", "deploy", "call", "rollback", "scale", "cost"):
        assert manifest.commands[step] in readme, step
    assert "https://api.runpod.ai/v2/ENDPOINT_ID/openai/v1" in readme and "--rp_serve_api" in readme


def test_runpod_gpu_must_be_a_pool_or_a_gpu_in_one(registered_version: Version, tmp_path: Path) -> None:
    output = deploy_fails(registered_version, tmp_path, "runpod", REFERENCE, "--gpu", "TPU-V5")
    assert "deploy.gpu" in output and "TPU-V5" in output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_job(out: Path, engine_url: str, job: dict) -> list:
    """`python handler.py --test_input JOB` (runpod's local test mode); the job's output from its log."""
    result = subprocess.run(
        [deploy_python(), "handler.py", "--test_input", json.dumps(job)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "ENGINE_URL": engine_url, "VLLM_STARTUP_TIMEOUT": "60"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if "Job result: " in line)
    return ast.literal_eval(line.split("Job result: ", 1)[1])["output"]


@pytest.mark.slow
def test_runpod_handler_answers_through_the_gpu_command_line(deploy_folder, tmp_path: Path) -> None:
    vllm_python = REPO / default_vllm_python()
    if not vllm_python.exists():
        pytest.fail(f"{vllm_python} is missing: run `make vllm`")
    out, manifest = deploy_folder("runpod")
    # The container's command line, with this machine's python and the deploy folder's model/ for /models.
    port = free_port()
    command = [str(vllm_python) if part == "python3" else part for part in manifest.engine_commands["gpu"]]
    command = [part.replace(manifest.model_root, str(out / "model")) for part in command]
    command[command.index("--port") + 1] = str(port)
    environment = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    log = tmp_path / "vllm.log"
    with log.open("w") as log_file:
        engine = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    engine_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # vLLM on CPU starts in 25-130 s
        while True:
            assert engine.poll() is None, f"vLLM exited with {engine.returncode}:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"vLLM not healthy after 600 s:\n{log.read_text()[-6000:]}"
            try:
                if httpx.get(f"{engine_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)

        question = [{"role": "user", "content": "What is the capital of France?"}]
        output = run_job(out, engine_url, {"input": {"messages": question, "sampling_params": {"max_tokens": 12}}})
        assert len(output) == 1, output
        completion = output[0]
        assert completion["object"] == "chat.completion" and completion["model"] == "extractor@champion"
        assert completion["choices"][0]["message"]["content"].strip() and completion["usage"]["completion_tokens"] > 0

        # RunPod's OpenAI form, streamed: the engine's server-sent events, one by one.
        body = {"messages": question, "max_tokens": 8, "stream": True}
        events = run_job(out, engine_url, {"input": {"openai_route": "/v1/chat/completions", "openai_input": body}})
        assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events), events
        assert events[-1] == "data: [DONE]\n\n"
        chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
        assert {chunk["model"] for chunk in chunks} == {"extractor@champion"}
        assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    except AssertionError:
        print(f"vLLM's log, last lines:\n{log.read_text()[-6000:]}")  # pytest shows it with the failure
        raise
    finally:
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
