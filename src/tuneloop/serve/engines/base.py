"""The engine interface the gateway talks to. Engines own generation; the gateway owns routing, auth and metrics.

vLLM, llama.cpp and remote engines speak OpenAI HTTP natively; the in-process Transformers engine implements the
same small interface directly.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError


@dataclass
class GenerationRequest:
    model: str  # a served model name (base or adapter)
    prompt: str | None = None  # raw text (completions)
    messages: list[dict[str, str]] | None = None  # chat
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Nothing reaches the client before the answer is complete (a non-streamed request): engines may then retry a
    # failed attempt from scratch, even after it had produced tokens.
    buffered: bool = False


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class MetricsSource:
    """An engine server's own Prometheus endpoint, which the gateway re-exports on its /metrics with `labels` added
    to every series (the engines listen on private ports that Prometheus cannot reach)."""

    url: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    name: str
    parent: str | None  # the base model of an adapter
    owned_by: str = "tuneloop"


def base_with_adapters(base_name: str, adapters: Iterable[str]) -> list[ServedModel]:
    """The models an engine serving one base and LoRA adapters on it exposes (adapters name the base as parent)."""
    return [ServedModel(base_name, None)] + [ServedModel(name, base_name) for name in adapters]


def saved_chat_template(folder: Path) -> str | None:
    """The chat template saved with a model or adapter (chat_template.jinja, else tokenizer_config.json's)."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None
    return template if isinstance(template, str) else None


def adapter_chat_template(base_folder: Path, adapters: Iterable[Path]) -> Path | None:
    """The adapters' chat_template.jinja when it differs from the base's (training used `model.chat_template`):
    the servers render with the base tokenizer's template unless told otherwise, and one server has one template."""
    base = saved_chat_template(base_folder)
    different = {
        folder: template
        for folder in adapters
        if (template := saved_chat_template(folder)) is not None and template != base
    }
    if not different:
        return None
    if len(set(different.values())) > 1 or len(different) != len(list(adapters)):
        raise TuneloopError(
            "these adapters were trained with different chat templates; one server renders with one template",
            hint="serve (or deploy) them separately",
        )
    folder = next(iter(different))
    if not (folder / "chat_template.jinja").exists():
        raise TuneloopError(f"{folder} keeps its chat template only in tokenizer_config.json", hint="re-save it")
    return folder / "chat_template.jinja"


class Engine(ABC):
    name: str
    #: speaks OpenAI's streaming format over HTTP: `stream_events` forwards the server's own bytes (pass-through)
    passthrough: bool = False

    @abstractmethod
    def models(self) -> list[ServedModel]: ...

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer; the last chunk carries finish_reason and token counts."""

    async def score(self, model: str, prompt: str, max_tokens: int, top: int, echo: bool) -> dict[str, Any]:
        """Completions with `logprobs`: greedy continuation plus per-token log-probabilities (OpenAI's legacy
        completions format); with `echo`, the prompt's tokens are scored too (what lm-eval's loglikelihood uses)."""
        raise NotImplementedError(f"the {self.name} engine does not return logprobs")

    def stream_events(self, request: GenerationRequest) -> AsyncIterator[bytes]:
        """Engines with `passthrough`: the answer as the server's own OpenAI server-sent events (whole events, the
        usage chunk included), with the served model's name."""
        raise NotImplementedError(f"the {self.name} engine has no pass-through stream")

    def stats(self) -> dict[str, float]:
        """Engine counters shown on /health (e.g. batches run, largest batch)."""
        return {}

    def metrics_sources(self) -> list[MetricsSource]:
        """The servers' own Prometheus endpoints (vLLM's, llama-server's /metrics); none for in-process engines."""
        return []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights or wait for a server; `/ready` answers 200 once this returns."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release resources after the gateway drained."""
