"""`tuneloop deploy modal`: a Modal app module serving the version with vLLM behind `@modal.web_server`.

The weights travel in a `modal.Volume` (deploy.modal_volume): `model/` is uploaded to its own folder, NAME-vN, and
the app mounts that folder read-only at /models, so every version keeps its files and `modal app rollback` to an
older deployment is instant (nothing to upload again). The app is named after the registry model, not the
version: a new champion is a new deployment of the same app, at the same URL. The module uses Modal 1.x names
(`modal.App`, `@modal.concurrent`, `scaledown_window`, `min_containers`/`max_containers`) and starts exactly
`ctx.vllm_command(MODEL_ROOT)`; vLLM reads the API key from the Modal Secret's VLLM_API_KEY itself.
"""

from __future__ import annotations

import json

from tuneloop.deploy import TargetOutput
from tuneloop.deploy.context import ENGINE_PORT, DeployContext
from tuneloop.errors import TuneloopError

MODEL_ROOT = "/models"
NEEDS_GGUF = False
APP_FILE = "modal_app.py"
API_KEY_VARIABLE = "VLLM_API_KEY"  # read by vLLM's OpenAI server when --api-key is not given
# Modal's `gpu` values (modal.com/docs/guide/gpu, Modal 1.6); Modal itself checks them only when deploying.
MODAL_GPUS = ("T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100", "H100!")
MODAL_GPUS += ("H200", "B200", "B200+")
REQUEST_TIMEOUT_S = 600  # one request's longest generation (Modal's `timeout`, default 300)


def endpoint_url(name: str) -> str:
    """The OpenAI base URL `modal deploy` prints: WORKSPACE--APP-FUNCTION.modal.run (function `serve`)."""
    return f"https://WORKSPACE--{name}-serve.modal.run/v1"


def modal_gpu(ctx: DeployContext) -> str:
    gpu = ctx.settings.gpu
    if gpu.upper() not in {known.upper() for known in MODAL_GPUS}:
        raise TuneloopError(
            f"deploy.gpu={gpu!r} is not a Modal GPU type",
            hint=f"pass --gpu with one of {', '.join(MODAL_GPUS)}",
        )
    return gpu if ctx.settings.gpu_count == 1 else f"{gpu}:{ctx.settings.gpu_count}"


def write(ctx: DeployContext) -> TargetOutput:
    command = ctx.vllm_command(MODEL_ROOT)
    name = ctx.model_name  # one app, one URL across versions
    volume_folder = f"/{ctx.name}"
    startup_timeout_s = int(max(600, ctx.config.serve.start_timeout_s))
    values = {
        "app_name": name,
        "gpu": modal_gpu(ctx),
        "volume_folder": volume_folder,
        "model_root": MODEL_ROOT,
        "engine_port": ENGINE_PORT,
        # A JSON list of strings is also a Python list literal: the command is embedded verbatim.
        "engine_command": json.dumps(command, indent=4),
        "startup_timeout_s": startup_timeout_s,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "api_key_variable": API_KEY_VARIABLE,
        "endpoint_url": endpoint_url(name),
    }
    ctx.write(APP_FILE, ctx.render("modal_app.py.j2", **values))
    commands = _commands(ctx, name, volume_folder)
    ctx.write("README.md", ctx.render("modal_README.md.j2", commands=commands, **values))
    return TargetOutput(engine_commands={"gpu": command}, images={}, commands=commands)


def _commands(ctx: DeployContext, name: str, volume_folder: str) -> dict[str, str]:
    volume = ctx.settings.modal_volume
    secret = ctx.settings.api_key_secret
    request = {"model": ctx.primary_model, "messages": [{"role": "user", "content": "Hello"}]}
    return {
        "secret": f'modal secret create {secret} {API_KEY_VARIABLE}="$(openssl rand -hex 24)"  # once',
        "upload": f"modal volume create {volume}  # once\nmodal volume put {volume} model {volume_folder}",
        "deploy": f"modal deploy {APP_FILE}",
        "call": f'curl {endpoint_url(name)}/chat/completions -H "Authorization: Bearer ${API_KEY_VARIABLE}" '
        f"-H 'Content-Type: application/json' -d '{json.dumps(request)}'",
        "rollback": f"modal app rollback {name}",
        # Live, until the next `modal deploy` (which applies the module's min/max again).
        "scale": f"python -c \"import modal; modal.Function.from_name('{name}', 'serve').autoscaler.update("
        f'min_containers={ctx.settings.min_replicas}, max_containers={ctx.settings.max_replicas})"',
        "cost": "tuneloop cost --platform modal",
    }
