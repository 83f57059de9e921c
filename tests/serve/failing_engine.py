"""The real in-process engine (tiny model), made to fail when a prompt asks it to: an engine failure cannot be
provoked on demand otherwise. "please fail" raises what a lost engine raises (TuneloopError: the gateway answers 503);
"please crash" raises a plain bug (RuntimeError: an unhandled 500)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import GenerationChunk, GenerationRequest
from tuneloop.serve.engines.transformers_engine import TransformersEngine


class FailsOnRequest(TransformersEngine):
    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt = " ".join(message["content"] for message in request.messages or [])
        if "please fail" in prompt:
            raise TuneloopError("the engine lost its device")
        if "please crash" in prompt:
            raise RuntimeError("a bug in the engine")
        async for chunk in super()._stream(request):
            yield chunk
