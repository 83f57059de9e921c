"""The traffic log (`serve.log_traffic`): every served response — prompt, answer, model, A/B variant, finish reason,
tokens — appended to the workspace's `serve/traffic.jsonl` under the id the client got, so the ratings posted to
/v1/feedback can be joined to what was rated (`tuneloop data from-feedback`).

It stores prompts and answers: it is off by default. Each gateway process appends to its own workspace's file (one
write per line, so replicas sharing a workspace on one host never interleave lines); replicas on several hosts each
keep their own file, and `from-feedback` takes several `--traffic` files. The record type is
`tuneloop.artifacts.traffic.TrafficRecord`.

Pass-through streams (HTTP engines) are forwarded as the engine's bytes; only when the log is on does
`PassthroughCapture` parse those events to collect the answer's text, finish reason and usage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tuneloop.artifacts.traffic import Endpoint, TrafficRecord, append_traffic
from tuneloop.serve.engines.base import GenerationChunk, GenerationRequest

log = logging.getLogger("tuneloop.gateway")


class TrafficLog:
    """Appends one `TrafficRecord` per served response to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.failed = False

    def record(
        self,
        response_id: str,
        asked: str,
        variant: str | None,
        generation: GenerationRequest,
        answers: list[str],
        totals: GenerationChunk,
        stream: bool = False,
        passthrough: bool = False,
    ) -> None:
        """Log one response: its `answers` in choice order, the finish reason of choice 0 and the tokens of all
        choices in `totals`. A write failure is logged once and never fails the request (the client has its answer)."""
        endpoint: Endpoint = "chat.completions" if generation.messages is not None else "completions"
        record = TrafficRecord(
            response_id=response_id,
            time=time.time(),
            model=asked,
            variant=variant,
            served=generation.model,
            endpoint=endpoint,
            stream=stream,
            passthrough=passthrough,
            messages=generation.messages,
            prompt=generation.prompt if generation.messages is None else None,
            answer=answers[0] if answers else "",
            other_choices=answers[1:],
            finish_reason=totals.finish_reason,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
        )
        try:
            append_traffic(self.path, record)
        except OSError as error:
            if not self.failed:
                self.failed = True
                log.error("traffic log %s cannot be written (%s): responses are not logged", self.path, error)


class PassthroughCapture:
    """What the client of a pass-through stream received, read from the engine's server-sent events: the text
    deltas (chat `delta.content` or completions `text`) of choice 0, its finish reason and the usage event's tokens.
    Events may be cut anywhere between reads: an incomplete one waits for the next read."""

    def __init__(self) -> None:
        self.pending = b""
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def read(self, events: bytes) -> None:
        *whole, self.pending = (self.pending + events).split(b"\n\n")
        for event in whole:
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                chunk: dict[str, Any] = json.loads(payload)
            except ValueError:
                continue
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                piece = delta.get("content") if "delta" in choice else choice.get("text")
                if isinstance(piece, str):
                    self.text.append(piece)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            usage = chunk.get("usage") or {}
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)

    @property
    def answer(self) -> str:
        return "".join(self.text)

    @property
    def totals(self) -> GenerationChunk:
        return GenerationChunk("", self.finish_reason, self.prompt_tokens, self.completion_tokens)
