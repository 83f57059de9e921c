"""Evaluated models that answer over an OpenAI-compatible API (`openai:`, `url:` references, or a local model whose
answers an engine serves): concurrent greedy answers with a progress bar, and what those answers cost.

The cost is the price table's `api:` entry for the model times the tokens the server counted (`usage`): every
request the evaluation sent it (evaluation rows and red-team prompts), prompt and completion tokens priced apart.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tuneloop.chat_client import ChatAnswer, ChatEndpoint, Messages, chat_generate
from tuneloop.prices import TokenPrice


def answer_over_api(
    endpoint: ChatEndpoint,
    prompts: list[Messages],
    max_new_tokens: int,
    concurrency: int,
    console: Console,
    title: str,
    stop: list[str] | None = None,
) -> list[ChatAnswer]:
    """Greedy answers in prompt order, `concurrency` requests in flight, with a progress bar titled `title`."""
    from rich.progress import Progress

    with Progress(console=console) as progress:
        task = progress.add_task(title, total=len(prompts))
        return chat_generate(
            endpoint,
            prompts,
            max_new_tokens,
            stop=stop,
            concurrency=concurrency,
            progress=lambda done: progress.advance(task, done),
        )


def answers_cost(price: TokenPrice | None, answers: list[ChatAnswer], tried: list[str]) -> tuple[float | None, str]:
    """(dollars for these answers or None when unpriced, a sentence saying how it was computed)."""
    prompt_tokens = sum(answer.prompt_tokens for answer in answers)
    completion_tokens = sum(answer.new_tokens for answer in answers)
    counted = f"{len(answers)} requests, {prompt_tokens} prompt + {completion_tokens} completion tokens"
    if price is None:
        names = ", ".join(f"`{name}`" for name in tried)
        return None, f"no cost: the price table has no `api:` entry named {names} ({counted})"
    usd = price.cost(prompt_tokens, completion_tokens)
    input_note = "" if price.usd_per_million_input_tokens is not None else "; prompt tokens unpriced (no input price)"
    return usd, f"price entry `{price.entry}` x {counted} = ${usd:.6f}{input_note}"


def usage_details(answers: list[ChatAnswer]) -> dict[str, Any]:
    return {
        "requests": len(answers),
        "prompt_tokens": sum(answer.prompt_tokens for answer in answers),
        "completion_tokens": sum(answer.new_tokens for answer in answers),
    }
