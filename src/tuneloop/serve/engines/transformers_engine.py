"""The in-process engine: Transformers (+ PEFT adapters on one base). Zero setup, and the reference for parity checks.

Generation runs in a worker thread; tokens stream back through Transformers' TextIteratorStreamer. Requests are
served one at a time per engine (a lock around generate), with the adapter selected per request (`set_adapter`, or
the base with adapters disabled). Batching concurrent requests is the job of the fast engines (vLLM, llama.cpp).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import Engine, GenerationChunk, GenerationRequest, ServedModel


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, base_name: str, base_folder: Path, adapters: dict[str, Path], dtype: Any = None) -> None:
        self.base_name = base_name
        self.base_folder = base_folder
        self.adapters = adapters
        self.dtype = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    def models(self) -> list[ServedModel]:
        return [ServedModel(self.base_name, None)] + [ServedModel(name, self.base_name) for name in self.adapters]

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_folder))
        model = AutoModelForCausalLM.from_pretrained(str(self.base_folder), dtype=self.dtype)
        if self.adapters:
            from peft import PeftModel

            items = list(self.adapters.items())
            model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
            for name, path in items[1:]:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.model != self.base_name and request.model not in self.adapters:
            raise TuneloopError(f"unknown model {request.model!r}")
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from transformers import TextIteratorStreamer

        tokenizer = self.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        else:
            text = request.prompt or ""
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=request.messages is None)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict[str, Any] = {}
        thread = threading.Thread(target=self._run, args=(request, inputs, streamer, result), daemon=True)
        thread.start()
        produced = ""
        stopped = False
        iterator = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, iterator, None)
            if piece is None:
                break
            if stopped or not piece:
                continue
            candidate = produced + piece
            cut = _first_stop(candidate, request.stop)
            if cut is not None:
                piece = candidate[len(produced) : max(cut, len(produced))]
                produced = candidate[:cut]
                stopped = True
                if piece:
                    yield GenerationChunk(piece)
                continue
            produced = candidate
            yield GenerationChunk(piece)
        await asyncio.to_thread(thread.join)
        if "error" in result:
            raise result["error"]
        completion_tokens = result.get("new_tokens", 0)
        finish = "stop" if stopped or completion_tokens < request.max_tokens else "length"
        yield GenerationChunk(
            "", finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )

    def _run(self, request: GenerationRequest, inputs: Any, streamer: Any, result: dict[str, Any]) -> None:
        import contextlib

        import torch

        try:
            with self._lock:
                adapter_context: Any = contextlib.nullcontext()
                if self.adapters:
                    if request.model == self.base_name:
                        adapter_context = self.model.disable_adapter()
                    else:
                        self.model.set_adapter(request.model)
                sampling = request.temperature > 0
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                kwargs: dict[str, Any] = {
                    "max_new_tokens": request.max_tokens,
                    "do_sample": sampling,
                    "streamer": streamer,
                    "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                }
                if sampling:
                    kwargs.update(temperature=request.temperature, top_p=request.top_p)
                with adapter_context, torch.no_grad():
                    output = self.model.generate(**inputs, **kwargs)
                new = output[0, inputs["input_ids"].shape[1] :].tolist()
                eos = self.tokenizer.eos_token_id
                result["new_tokens"] = new.index(eos) if eos in new else len(new)
        except Exception as error:  # surfaced to the request that caused it
            result["error"] = error
            streamer.end()


def _first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None
