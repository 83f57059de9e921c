"""Chat completions from any OpenAI-compatible endpoint (a tuneloop gateway, llama-server, vLLM, OpenAI itself),
many prompts at once: what evaluation uses for API models, judges and engine-backed generation.

Greedy (temperature 0) unless asked to sample, concurrent (a thread pool over the `openai` client, which retries
429/5xx with backoff), results in prompt order. A request that still fails is raised with the endpoint and the
prompt's index.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tuneloop.errors import TuneloopError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatEndpoint:
    """One model behind an OpenAI-compatible `/v1` base URL."""

    base_url: str  # ends with /v1
    model: str  # the `model` field of each request
    api_key: str | None = None
    label: str = ""  # short name in reports
    # Fields merged into each request's JSON body: what selects a LoRA on a llama-server (`lora` scales), for one.
    extra_body: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"


@dataclass
class ChatAnswer:
    text: str
    new_tokens: int  # completion tokens as the server counted them
    hit_max_tokens: bool  # finish_reason == "length"
    prompt_tokens: int
    seconds: float
    error: str | None = None  # set, with no text, when the request failed and failures were kept (keep_failures)


def chat_generate(
    endpoint: ChatEndpoint,
    prompts: list[Messages],
    max_new_tokens: int,
    *,
    stop: list[str] | None = None,
    concurrency: int = 8,
    timeout: float = 600.0,
    max_retries: int = 3,
    progress: Callable[[int], None] | None = None,
    keep_failures: bool = False,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[ChatAnswer]:
    """Answers to `prompts` (message lists), in order, greedy unless `temperature` > 0 (`seed`: the request's
    sampling seed, prompt i sending seed + i); `progress(1)` after each one. A request that still fails after the
    client's retries raises, or with `keep_failures` becomes an answer carrying its `error`."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key or "none", timeout=timeout, max_retries=max_retries
    )

    def one(index: int) -> ChatAnswer:
        started = time.perf_counter()
        try:
            response = client.chat.completions.create(
                model=endpoint.model,
                messages=prompts[index],  # type: ignore[arg-type]
                max_tokens=max_new_tokens,
                temperature=temperature,
                **({} if seed is None else {"seed": seed + index}),  # unset: no `seed` field sent
                stop=stop or None,
                extra_body=endpoint.extra_body,
            )
        except OpenAIError as error:
            message = f"{endpoint.describe()} failed on prompt {index}: {error}"
            if keep_failures:
                if progress is not None:
                    progress(1)
                return ChatAnswer("", 0, False, 0, time.perf_counter() - started, error=message)
            raise TuneloopError(message, hint="check the URL, the model name and the API key variable") from error
        choice = response.choices[0]
        usage = response.usage
        answer = ChatAnswer(
            text=(choice.message.content or "").strip(),
            new_tokens=usage.completion_tokens if usage else 0,
            hit_max_tokens=choice.finish_reason == "length",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            seconds=time.perf_counter() - started,
        )
        if progress is not None:
            progress(1)
        return answer

    if not prompts:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompts)))) as pool:
        return list(pool.map(one, range(len(prompts))))
