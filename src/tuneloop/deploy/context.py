"""What every target writes from: the deploy settings (config.deploy with the command's overrides), the bundled model,
the engine command lines as a container runs them, image names, and the file writer that records what it wrote."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from tuneloop.artifacts.deployment import DeployedModel
from tuneloop.cluster.job import dns_label
from tuneloop.config import DeployConfig, LoopConfig
from tuneloop.deploy.bundle import ADAPTERS_DIR, BASE_DIR, BASE_GGUF, GGUF_DIR
from tuneloop.serve.engines.llamacpp import llama_server_arguments
from tuneloop.serve.engines.vllm import VLLM_SERVER_MODULE, vllm_arguments
from tuneloop.train.launch import shell_join

# Ports inside the containers: the engine on 8000 (vLLM's default), the gateway in front of it on 8080.
ENGINE_PORT = 8000
GATEWAY_PORT = 8080
MODEL_FOLDER = "model"  # the bundled model inside the deploy folder
ImageRole = Literal["gpu", "cpu", "gateway", "worker"]


@dataclass
class DeployContext:
    config: LoopConfig
    settings: DeployConfig  # config.deploy with the command's overrides applied
    out: Path  # the deploy folder being written
    model: DeployedModel
    files: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The deployment's DNS-safe name (Kubernetes, Modal, RunPod, SageMaker): NAME-vVERSION."""
        raw = (
            f"{self.model.registry_name}-v{self.model.version}"
            if self.model.registry_name and self.model.version
            else next(iter(self.model.adapters.values()))
        )
        return dns_label(raw, 50)

    @property
    def model_name(self) -> str:
        """The DNS-safe name every version of the registry model shares (Kubernetes objects, the Modal app), so a
        new version rolls the same deployment; the deployment's `name` for an unregistered adapter."""
        return dns_label(self.model.registry_name, 50) if self.model.registry_name else self.name

    @property
    def served_models(self) -> list[str]:
        """What clients put in `model`: the base first, then the adapters (the names `tuneloop serve` uses)."""
        return [self.model.base_model, *self.model.adapters]

    @property
    def primary_model(self) -> str:
        """The version's own served name (its adapter)."""
        return next(iter(self.model.adapters))

    @cached_property
    def max_model_len(self) -> int:
        """`serve.max_model_len` capped at the base model's own maximum, as `tuneloop serve` caps it."""
        from tuneloop.models import max_context

        own = max_context(self.out / MODEL_FOLDER / BASE_DIR)
        return min(self.config.serve.max_model_len, own) if own else self.config.serve.max_model_len

    @cached_property
    def model_bytes(self) -> int:
        """The size of the bundled model folder (disks and claims are sized from it)."""
        return sum(path.stat().st_size for path in (self.out / MODEL_FOLDER).rglob("*") if path.is_file())

    def image(self, role: ImageRole) -> str:
        """REPOSITORY/NAME:vVERSION-ROLE for a registry version (one repository per model, a tag per version)."""
        if self.model.registry_name and self.model.version:
            repository = re.sub(r"[^a-z0-9._-]+", "-", self.model.registry_name.lower())
            return f"{self.settings.image_repository}/{repository}:v{self.model.version}-{role}"
        return f"{self.settings.image_repository}/{self.name}:{role}"

    def vllm_arguments(self, root: str) -> list[str]:
        """vLLM's flags with the model folder at `root` in the container (built by serve's own function)."""
        base = PurePosixPath(root)
        modules = {name: str(base / ADAPTERS_DIR / folder) for name, folder in self.model.adapters.items()}
        arguments = vllm_arguments(
            self.config.serve,
            self.model.base_model,
            str(base / BASE_DIR),
            modules,
            self.model.lora_rank,
            self.max_model_len,
            self.chat_template(root),
            for_this_machine=False,  # the image's GPU decides `auto`, not this machine's CPU
        )
        if self.settings.gpu_count > 1:
            arguments += ["--tensor-parallel-size", str(self.settings.gpu_count)]
        return arguments

    def vllm_command(self, root: str, host: str = "0.0.0.0") -> list[str]:
        """The GPU engine's whole command line in the container (vLLM's images have python3 on PATH)."""
        return [
            "python3",
            "-m",
            VLLM_SERVER_MODULE,
            *self.vllm_arguments(root),
            "--host",
            host,
            "--port",
            str(ENGINE_PORT),
        ]

    def llamacpp_command(self, root: str, executable: str = "/app/llama-server", host: str = "0.0.0.0") -> list[str]:
        """The CPU engine's whole command line in the container (llama-server, built in the image)."""
        gguf = PurePosixPath(root) / GGUF_DIR
        arguments = llama_server_arguments(
            self.config.serve,
            self.model.base_model,
            str(gguf / BASE_GGUF),
            [str(gguf / f"{folder}.gguf") for folder in self.model.adapters.values()],
            self.max_model_len,
            threads=self.config.serve.llamacpp_threads,
            chat_template=self.chat_template(root),
        )
        return [executable, *arguments, "--host", host, "--port", str(ENGINE_PORT)]

    def chat_template(self, root: str) -> str | None:
        """The adapter's template file in the container when it differs from the base's (see adapter_chat_template)."""
        return None if self._chat_template is None else str(PurePosixPath(root) / self._chat_template)

    @cached_property
    def _chat_template(self) -> str | None:
        """The adapter's own template file, relative to the model folder (looked up once: every engine command
        line of every target asks)."""
        from tuneloop.serve.engines.base import adapter_chat_template

        local = self.out / MODEL_FOLDER
        found = adapter_chat_template(
            local / BASE_DIR, [local / ADAPTERS_DIR / folder for folder in self.model.adapters.values()]
        )
        return None if found is None else found.relative_to(local).as_posix()

    def write(self, relative: str, text: str, executable: bool = False) -> Path:
        """Write a file of the deploy folder and record it in deploy.json."""
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if executable:
            path.chmod(0o755)
        if relative not in self.files:
            self.files.append(relative)
        return path

    def render(self, template: str, **values: Any) -> str:
        """A Jinja template from deploy/templates with this context as `ctx`."""
        from jinja2 import Environment, PackageLoader, StrictUndefined

        environment = Environment(
            loader=PackageLoader("tuneloop.deploy", "templates"),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        environment.filters["shell"] = shell_join
        return environment.get_template(template).render(ctx=self, **values)
