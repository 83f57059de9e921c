"""`tuneloop deploy runpod`: a RunPod serverless worker image and the endpoint that runs it.

The worker (handler.py, on the `runpod` SDK) starts vLLM in its container with `ctx.vllm_command(MODEL_ROOT)`,
listening on loopback only as runpod-workers/worker-vllm does (RunPod authenticates callers with RunPod API keys),
and proxies jobs to the engine's OpenAI routes, so the endpoint's https://api.runpod.ai/v2/ID/openai/v1 answers the
`openai` client. The weights travel in the image (COPY model/ to /models): a version is an image tag, the endpoint
rolls by switching templates and rolls back to the previous template at once, with nothing to download but the
image. (A network volume at /runpod-volume would keep images small but ties workers to its data center.)

endpoint.json holds the arguments of the runpod SDK's `create_template` and `create_endpoint`; its env repeats the
engine's --max-model-len, --max-loras and --lora-modules under worker-vllm's names (MAX_MODEL_LEN, MAX_LORAS,
LORA_MODULES) so they can be changed on the endpoint without a new image; as written, they start the same command.
"""

from __future__ import annotations

import json
import math

from tuneloop.deploy import TargetOutput
from tuneloop.deploy.context import ENGINE_PORT, DeployContext
from tuneloop.errors import TuneloopError

MODEL_ROOT = "/models"
NEEDS_GGUF = False
RUNPOD_VERSION = "1.12.0"  # the SDK the worker is written and checked against (`make deploy-tools`)
ENGINE_HOST = "127.0.0.1"  # the engine is reached through the handler only
SCALER = {"scaler_type": "QUEUE_DELAY", "scaler_value": 4}  # add a worker when jobs wait over 4 s (RunPod's default)
IMAGE_DISK_GB = 30  # the vLLM image itself, unpacked, with room to spare
# RunPod's serverless GPU pools and the GPUs in each (runpod GpuGroup); deploy.gpu may name either.
GPU_POOLS = {
    "AMPERE_16": ("A4000", "A4500", "RTX4000", "RTX2000", "T4"),
    "AMPERE_24": ("L4", "A5000", "RTX3090", "A10", "A10G"),
    "ADA_24": ("RTX4090", "4090"),
    "ADA_32_PRO": ("RTX5090", "5090"),
    "AMPERE_48": ("A40", "A6000", "A100-40GB"),
    "ADA_48_PRO": ("L40S", "L40", "RTX6000", "RTX-PRO-6000"),
    "AMPERE_80": ("A100", "A100-80GB"),
    "ADA_80_PRO": ("H100", "H100!"),
    "HOPPER_141": ("H200",),
}


def gpu_pools(gpu: str) -> str:
    """RunPod's `gpu_ids` for deploy.gpu: pool ids as they are (comma-separated), a GPU name as its pool."""
    requested = [part.strip().upper() for part in gpu.split(",") if part.strip()]
    pools = []
    for name in requested:
        pool = name if name in GPU_POOLS else next((p for p, gpus in GPU_POOLS.items() if name in gpus), None)
        if pool is None:
            raise TuneloopError(
                f"deploy.gpu={gpu!r}: {name} is neither a RunPod GPU pool nor a GPU in one",
                hint=f"pass --gpu with a pool ({', '.join(GPU_POOLS)}) or a GPU such as L4, A100, H100",
            )
        pools.append(pool)
    return ",".join(dict.fromkeys(pools))


def flag_values(command: list[str], flag: str) -> list[str]:
    """The values following `flag` in `command`, up to the next flag."""
    start = command.index(flag) + 1
    end = start
    while end < len(command) and not command[end].startswith("--"):
        end += 1
    return command[start:end]


def worker_environment(ctx: DeployContext, command: list[str]) -> dict[str, str]:
    """The endpoint's env, in worker-vllm's names, read off the engine command so that it starts that command."""
    modules = [value.split("=", 1) for value in flag_values(command, "--lora-modules")]
    return {
        "MAX_MODEL_LEN": flag_values(command, "--max-model-len")[0],
        "MAX_LORAS": flag_values(command, "--max-loras")[0],
        "LORA_MODULES": json.dumps([{"name": name, "path": path} for name, path in modules]),
        "MAX_CONCURRENCY": str(ctx.settings.max_concurrent_requests),
        "VLLM_STARTUP_TIMEOUT": str(int(max(1200, ctx.config.serve.start_timeout_s))),
    }


def endpoint_spec(ctx: DeployContext, command: list[str]) -> dict[str, dict[str, object]]:
    """Keyword arguments of runpod.create_template and runpod.create_endpoint (without template_id)."""
    return {
        "template": {
            "name": ctx.name,
            "image_name": ctx.image("worker"),
            "container_disk_in_gb": IMAGE_DISK_GB + math.ceil(ctx.model_bytes / 1e9),
            "env": worker_environment(ctx, command),
            "is_serverless": True,
        },
        "endpoint": {
            "name": ctx.name,
            "gpu_ids": gpu_pools(ctx.settings.gpu),
            "gpu_count": ctx.settings.gpu_count,
            "workers_min": ctx.settings.min_replicas,
            "workers_max": ctx.settings.max_replicas,
            "idle_timeout": ctx.settings.scaledown_window_s,
            **SCALER,
            "flashboot": True,  # RunPod's snapshot of a started worker: shorter cold starts
        },
    }


def write(ctx: DeployContext) -> TargetOutput:
    command = ctx.vllm_command(MODEL_ROOT, host=ENGINE_HOST)
    image = ctx.image("worker")
    spec = endpoint_spec(ctx, command)
    values = {
        "model_root": MODEL_ROOT,
        "engine_port": ENGINE_PORT,
        "engine_command": json.dumps(command, indent=4),
        "runpod_version": RUNPOD_VERSION,
        "image": image,
        "spec": spec,
    }
    ctx.write("handler.py", ctx.render("runpod_handler.py.j2", **values))
    ctx.write("Dockerfile", ctx.render("runpod_Dockerfile.j2", **values))
    ctx.write("endpoint.json", json.dumps(spec, indent=2) + "\n")
    ctx.write("create_endpoint.py", ctx.render("runpod_create_endpoint.py.j2", **values))
    ctx.write("test_input.json", json.dumps({"input": _sample_input(ctx)}, indent=2) + "\n")
    commands = _commands(ctx, image, spec)
    ctx.write("README.md", ctx.render("runpod_README.md.j2", commands=commands, **values))
    return TargetOutput(engine_commands={"gpu": command}, images={"worker": image}, commands=commands)


def _sample_input(ctx: DeployContext) -> dict[str, object]:
    return {
        "openai_route": "/v1/chat/completions",
        "openai_input": {
            "model": ctx.primary_model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 32,
        },
    }


def _commands(ctx: DeployContext, image: str, spec: dict[str, dict[str, object]]) -> dict[str, str]:
    local_input = json.dumps({"input": {"messages": [{"role": "user", "content": "Hello"}], "sampling_params": {}}})
    endpoint = spec["endpoint"]
    return {
        "test": f"python handler.py --test_input '{local_input}'",
        "build": f"docker build --platform linux/amd64 -t {image} .",
        "push": f"docker push {image}",
        "deploy": "RUNPOD_API_KEY=... python create_endpoint.py",
        "call": "curl https://api.runpod.ai/v2/ENDPOINT_ID/openai/v1/chat/completions "
        '-H "Authorization: Bearer $RUNPOD_API_KEY" -H "Content-Type: application/json" '
        f"-d '{json.dumps({'model': ctx.primary_model, 'messages': [{'role': 'user', 'content': 'Hello'}]})}'",
        "rollback": "RUNPOD_API_KEY=... python create_endpoint.py --endpoint-id ENDPOINT_ID "
        "--template-id PREVIOUS_TEMPLATE_ID",
        "scale": "curl -X PATCH https://rest.runpod.io/v1/endpoints/ENDPOINT_ID "
        '-H "Authorization: Bearer $RUNPOD_API_KEY" -H "Content-Type: application/json" '
        f"-d '{json.dumps({'workersMin': endpoint['workers_min'], 'workersMax': endpoint['workers_max']})}'",
        "cost": "tuneloop cost --platform runpod",
    }
