"""`tuneloop deploy docker`: images for the version and a one-host production stack.

    Dockerfile           multi-stage: `gpu` (vLLM + base + adapters), `cpu` (llama-server built from tuneloop's
                         pinned llama.cpp + GGUFs), `gateway` (tuneloop's gateway, wheel built from gateway/source)
    gateway/             the gateway's configs (gateway-gpu.yaml, gateway-cpu.yaml) and tuneloop's source
    compose.yaml         profiles `gpu` and `cpu`: engine + gateway + Prometheus + Grafana
    monitoring/          Prometheus scrape config, Grafana datasource and tuneloop's dashboard
    .hadolint.yaml       the Dockerfile lint rules relaxed, each with its reason

`write_images` is shared with the targets whose pods run these images (k8s).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from tuneloop.deploy import TargetOutput
from tuneloop.deploy.context import ENGINE_PORT, GATEWAY_PORT, DeployContext
from tuneloop.train.launch import shell_join

MODEL_ROOT = "/models"
NEEDS_GGUF = True
GATEWAY_CONFIGS = {"gpu": "gateway-gpu.yaml", "cpu": "gateway-cpu.yaml"}
# Portable x86-64 build for images (a native build is tied to the build machine's CPU): the Makefile's flags.
LLAMACPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
TORCH_SPEC = "torch==2.13.0"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:12.1.0"
# Rules relaxed for the generated Dockerfile, with why (hadolint reads this file from the build folder).
HADOLINT_IGNORED = {
    "DL3008": "Debian package versions are not pinned: bookworm's security updates should land on rebuild",
    "DL3006": "the vLLM base image's tag comes in through the VLLM_IMAGE build argument",
}


@dataclass
class ImageBuild:
    images: dict[str, str]  # role (gpu, cpu, gateway) -> image reference
    build: str  # shell commands that build them
    push: str  # shell commands that push them


def write_images(ctx: DeployContext, engine_url: str = f"http://engine:{ENGINE_PORT}/v1") -> ImageBuild:
    """The Dockerfile, the gateway's configs (reaching the engine at `engine_url`) and tuneloop's source for the
    gateway image; returns the image names and the commands that build and push them."""
    from tuneloop.registry.export import LLAMA_CPP_PYTHON

    ctx.write(
        "Dockerfile",
        ctx.render(
            "Dockerfile.j2",
            vllm_image=ctx.settings.vllm_image,
            llamacpp_sdist=LLAMA_CPP_PYTHON,
            llamacpp_cmake_args=LLAMACPP_CMAKE_ARGS,
            model_root=MODEL_ROOT,
            engine_port=ENGINE_PORT,
            gateway_port=GATEWAY_PORT,
            cpu_command=ctx.llamacpp_command(MODEL_ROOT),
            gpu_command=ctx.vllm_command(MODEL_ROOT),
            torch_spec=TORCH_SPEC,
        ),
    )
    ctx.write(".dockerignore", "**/__pycache__\n**/*.pyc\n*.md\ndeploy.json\n")
    ctx.write(
        ".hadolint.yaml",
        "".join(f"# {rule}: {why}\n" for rule, why in HADOLINT_IGNORED.items())
        + yaml.safe_dump({"ignored": list(HADOLINT_IGNORED)}),
    )
    for device, name in GATEWAY_CONFIGS.items():
        ctx.write(f"gateway/{name}", gateway_config(ctx, device, engine_url))
    _copy_source(ctx)
    images = {role: ctx.image(role) for role in ("gpu", "cpu", "gateway")}
    build = "\n".join(f"docker build --target {role} -t {image} ." for role, image in images.items())
    push = "\n".join(f"docker push {image}" for image in images.values())
    return ImageBuild(images, build, push)


def gateway_config(ctx: DeployContext, device: str, engine_url: str) -> str:
    """The gateway's loop config: a remote engine at `engine_url`; on CPUs the llama-server's LoRAs by name (it
    selects adapters by a request field, which the gateway adds); the serving limits of the local config."""
    serve = ctx.config.serve
    settings = {
        "engine": "remote",
        "remote_urls": [engine_url],
        "max_model_len": serve.max_model_len,
        "max_tokens": serve.max_tokens,
        "max_request_bytes": serve.max_request_bytes,
        "rate_limit_per_minute": serve.rate_limit_per_minute,
        "routes": {name: route.model_dump() for name, route in serve.routes.items()},
    }
    if device == "cpu":
        settings["remote_llamacpp_adapters"] = list(ctx.model.adapters)
    config = {"project": {"name": ctx.config.project.name}, "model": {"base": ctx.model.base_model}, "serve": settings}
    header = (
        f"# tuneloop's gateway in front of the {device} engine of {ctx.name}; API keys come from $TUNELOOP_API_KEYS.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def _copy_source(ctx: DeployContext) -> None:
    """tuneloop's own source (the package and its pyproject), from which the gateway image builds a wheel."""
    package = Path(str(resources.files("tuneloop")))
    project = package.parent.parent
    target = ctx.out / "gateway" / "source"
    shutil.copytree(
        package, target / "src" / "tuneloop", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
    )
    pyproject = project / "pyproject.toml"
    if pyproject.exists():
        shutil.copy(pyproject, target / "pyproject.toml")
        shutil.copy(project / "README.md", target / "README.md")
    else:  # an installed wheel: its metadata is the project's
        ctx.write("gateway/source/pyproject.toml", _minimal_pyproject())
    ctx.files.extend(sorted(str(path.relative_to(ctx.out)) for path in target.rglob("*") if path.is_file()))


def _minimal_pyproject() -> str:
    from importlib.metadata import distribution

    dist = distribution("tuneloop")
    requirements = [req for req in dist.requires or [] if "extra ==" not in req]
    serve = [req.split(";")[0].strip() for req in dist.requires or [] if 'extra == "serve"' in req]
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "tuneloop"\nversion = "{dist.version}"\ndependencies = {requirements!r}\n\n'
        f"[project.optional-dependencies]\nserve = {serve!r}\n\n"
        '[project.scripts]\ntuneloop = "tuneloop.cli:app"\n\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n\n'
        '[tool.setuptools.package-data]\ntuneloop = ["**/*.j2", "**/*.yaml", "**/*.yml", "deploy/monitoring/**/*.json"]\n'
    )


def write(ctx: DeployContext) -> TargetOutput:
    build = write_images(ctx)
    monitoring = resources.files("tuneloop.deploy") / "monitoring"
    ctx.write("monitoring/prometheus.yml", _prometheus_config(ctx))
    ctx.write(
        "monitoring/grafana/datasources/prometheus.yaml",
        yaml.safe_dump(
            {
                "apiVersion": 1,
                "datasources": [
                    {"name": "Prometheus", "type": "prometheus", "access": "proxy", "url": "http://prometheus:9090"}
                ],
            }
        ),
    )
    ctx.write(
        "monitoring/grafana/dashboards/tuneloop.yaml",
        (monitoring / "grafana" / "provisioning" / "dashboards" / "tuneloop.yaml").read_text(encoding="utf-8"),
    )
    ctx.write(
        "monitoring/grafana/dashboards/tuneloop/tuneloop-dashboard.json",
        (monitoring / "grafana" / "tuneloop-dashboard.json").read_text(encoding="utf-8"),
    )
    ctx.write(
        "compose.yaml",
        ctx.render(
            "compose.yaml.j2",
            images=build.images,
            gateway_configs=GATEWAY_CONFIGS,
            engine_port=ENGINE_PORT,
            gateway_port=GATEWAY_PORT,
            prometheus_image=PROMETHEUS_IMAGE,
            grafana_image=GRAFANA_IMAGE,
        ),
    )
    port = 8000
    commands = {
        "build": build.build,
        "push": build.push,
        "deploy": "docker compose --profile gpu up -d    # or --profile cpu: llama.cpp on CPUs",
        "call": f"curl http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer $KEY' "
        f'-d \'{{"model": "{ctx.primary_model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'',
        "rollback": f"tuneloop deploy docker {ctx.model.registry_name or ctx.primary_model}@previous ... && "
        "docker compose --profile gpu up -d --build",
    }
    ctx.write(
        "README.md",
        ctx.render(
            "README.docker.md.j2",
            images=build.images,
            commands=commands,
            port=port,
            cpu_command=shell_join(ctx.llamacpp_command(MODEL_ROOT)),
            gpu_command=shell_join(ctx.vllm_command(MODEL_ROOT)),
        ),
    )
    return TargetOutput(
        engine_commands={"gpu": ctx.vllm_command(MODEL_ROOT), "cpu": ctx.llamacpp_command(MODEL_ROOT)},
        images=build.images,
        commands=commands,
    )


def _prometheus_config(ctx: DeployContext) -> str:
    """With a gateway, one job: the gateway's /metrics re-exports the engine's own series (`serve.engine_metrics`),
    so scraping the engine too would count them twice. Without one, the engine is scraped directly."""
    if ctx.settings.gateway:
        jobs = [{"job_name": "tuneloop-gateway", "static_configs": [{"targets": [f"gateway:{GATEWAY_PORT}"]}]}]
    else:
        jobs = [{"job_name": "engine", "static_configs": [{"targets": [f"engine:{ENGINE_PORT}"]}]}]
    for job in jobs:
        job["static_configs"][0]["labels"] = {"deployment": ctx.name}
    return yaml.safe_dump({"global": {"scrape_interval": "5s"}, "scrape_configs": jobs}, sort_keys=False)
