"""The in-process engine: Transformers + PEFT adapters on one base. Zero setup, and the reference for parity checks.

Concurrent requests are batched dynamically: a worker thread takes whatever is waiting (up to `max_batch_size`,
after a short gather window), runs one left-padded `generate` for the group, and streams each row's new text back to
its request as tokens arrive. Rows may use different adapters in the same batch (PEFT's mixed-adapter batches,
`adapter_names=[...]`, `__base__` for the base model). Requests are grouped by sampling settings; a request with a
`seed` runs alone so its seed means what it says. This is simple dynamic batching, not a paged-attention scheduler:
the fast path is vLLM.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_saved_tokenizer, pad_token_id
from tuneloop.serve.engines.base import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    ServedModel,
    base_with_adapters,
)

BASE_ADAPTER = "__base__"
# How long the worker waits for more requests to join a batch: long enough for concurrent arrivals, short enough
# to be invisible next to a forward pass.
GATHER_SECONDS = 0.005


@dataclass
class _Job:
    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    stopped: bool = False

    def emit(self, item: GenerationChunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        settings: ServeConfig,
        base_name: str,
        base_folder: Path,
        adapters: dict[str, Path],
        dtype: Any,
        trust_remote_code: bool = False,
    ) -> None:
        self.trust_remote_code = trust_remote_code
        self.base_name = base_name
        self.base_folder = base_folder
        self.adapters = adapters
        self.dtype = dtype
        self.max_batch_size = settings.max_batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self._pending: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._batches = 0
        self._largest_batch = 0
        self._score_lock = threading.Lock()

    def stats(self) -> dict[str, float]:
        return {"batches": self._batches, "largest_batch": self._largest_batch}

    def models(self) -> list[ServedModel]:
        return base_with_adapters(self.base_name, self.adapters)

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._worker = threading.Thread(target=self._serve_forever, name="tuneloop-engine", daemon=True)
        self._worker.start()

    async def stop(self) -> None:
        self._pending.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)

    def _load(self) -> None:
        self.tokenizer = load_saved_tokenizer(self.base_folder, self.trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_model(
            self.base_folder, dtype=self.dtype, adapters=self.adapters, trust_remote_code=self.trust_remote_code
        ).eval()

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.model != self.base_name and request.model not in self.adapters:
            raise TuneloopError(f"unknown model {request.model!r}")
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        tokenizer = self.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(request.prompt or "")["input_ids"]
        _require_tokens(prompt_ids)
        job = _Job(request, list(prompt_ids), asyncio.get_running_loop(), asyncio.Queue())
        self._pending.put(job)
        while True:
            item = await job.out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return

    async def score(self, model: str, prompt: str, max_tokens: int, top: int, echo: bool) -> dict[str, Any]:
        if model != self.base_name and model not in self.adapters:
            raise TuneloopError(f"unknown model {model!r}")
        return await asyncio.to_thread(self._score, model, prompt, max_tokens, top, echo)

    def _score(self, model: str, prompt: str, max_tokens: int, top: int, echo: bool) -> dict[str, Any]:
        import torch

        tokenizer = self.tokenizer
        prompt_ids = tokenizer(prompt)["input_ids"]
        _require_tokens(prompt_ids)
        extra: dict[str, Any] = {}
        if self.adapters:
            extra["adapter_names"] = [BASE_ADAPTER if model == self.base_name else model]
        with self._score_lock, torch.no_grad():
            new_ids: list[int] = []
            if max_tokens > 0:
                output = self.model.generate(
                    input_ids=torch.tensor([prompt_ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad_token_id(tokenizer),
                    **extra,
                )
                new_ids = output[0, len(prompt_ids) :].tolist()
                if tokenizer.eos_token_id in new_ids:
                    new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id) + 1]
            full = prompt_ids + new_ids
            logits = self.model(input_ids=torch.tensor([full]), **extra).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        finished = bool(new_ids) and new_ids[-1] == tokenizer.eos_token_id
        text_ids = new_ids[:-1] if finished else new_ids
        start = 0 if echo else len(prompt_ids)
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for position in range(start, len(prompt_ids) + len(text_ids)):
            piece = tokenizer.decode([full[position]])
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
            if position == 0:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            row = log_probs[position - 1]
            token_logprobs.append(float(row[full[position]]))
            best = torch.topk(row, max(top, 1))
            top_logprobs.append(
                {tokenizer.decode([int(i)]): float(v) for v, i in zip(best.values, best.indices, strict=True)}
            )
        return {
            "text": tokenizer.decode(text_ids, skip_special_tokens=True),
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            },
            "finish_reason": "stop" if finished else "length",
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(text_ids),
        }

    # -- the worker thread ----------------------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + GATHER_SECONDS
            while len(batch) < self.max_batch_size and first.request.seed is None:
                try:
                    job = self._pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self._pending.put(None)
                    break
                if job.request.seed is not None or _sampling(job.request) != _sampling(first.request):
                    self._pending.put(job)  # runs in a later group
                    break
                batch.append(job)
            try:
                self._run_batch(batch)
            except Exception as error:  # report to every request of the failed batch, keep serving
                for job in batch:
                    if not job.done:
                        job.emit(error)

    def _run_batch(self, batch: list[_Job]) -> None:
        import torch

        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(batch))
        tokenizer = self.tokenizer
        pad_id = pad_token_id(tokenizer)
        longest = max(len(job.prompt_ids) for job in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, job in enumerate(batch):
            input_ids[row, longest - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention[row, longest - len(job.prompt_ids) :] = 1
        request = batch[0].request
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(job.request.max_tokens for job in batch),
            "do_sample": request.temperature > 0,
            "pad_token_id": pad_id,
            "streamer": _BatchStreamer(self, batch),
        }
        if request.temperature > 0:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
            if request.seed is not None:
                torch.manual_seed(request.seed)
        if self.adapters:
            kwargs["adapter_names"] = [
                BASE_ADAPTER if job.request.model == self.base_name else job.request.model for job in batch
            ]
        with torch.no_grad():
            self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        for job in batch:
            self._finish(job)

    def _advance(self, job: _Job, token: int) -> None:
        """One new token for one request: decode, check stop sequences and budget, stream the new text."""
        if job.done:
            return
        eos = self.tokenizer.eos_token_id
        if token == eos:
            job.stopped = True
            self._finish(job)
            return
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            if len(job.tokens) >= job.request.max_tokens:
                self._finish(job)
            return
        stops = [text.find(stop) for stop in job.request.stop if stop and stop in text]
        if stops:
            text = text[: min(stops)]
            job.stopped = True
        new = text[len(job.text) :]
        job.text = text
        if new:
            job.emit(GenerationChunk(new))
        if job.stopped or len(job.tokens) >= job.request.max_tokens:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if job.done:
            return
        job.done = True
        job.emit(
            GenerationChunk(
                "",
                finish_reason="stop" if job.stopped else "length",
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.tokens),
            )
        )


class _BatchStreamer:
    """Transformers streamer protocol (`put`/`end`) that routes each row's new token to its request."""

    def __init__(self, engine: TransformersEngine, batch: list[_Job]) -> None:
        self.engine = engine
        self.batch = batch
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        for job, token in zip(self.batch, tokens, strict=True):
            self.engine._advance(job, int(token))

    def end(self) -> None:
        for job in self.batch:
            self.engine._finish(job)


def _require_tokens(prompt_ids: list[int]) -> None:
    """generate() cannot start from nothing (the gateway refuses empty prompts too; other callers may not)."""
    if not prompt_ids:
        raise TuneloopError("the prompt is empty: nothing to continue from")


def _sampling(request: GenerationRequest) -> tuple[bool, float, float]:
    return (request.temperature > 0, request.temperature, request.top_p)
