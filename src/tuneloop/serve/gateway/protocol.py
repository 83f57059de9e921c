"""OpenAI-compatible request and response models (the subset tuneloop serves), validated with pydantic."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_TEMPERATURE = 0.01


class _Request(BaseModel):
    # Unknown OpenAI parameters are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    # int64, as OpenAI's; engines seed with it (torch refuses anything outside 64 bits: a 500 before this bound).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, value: float) -> float:
        # Dividing logits by a temperature near zero (5e-324 is valid JSON) overflows them to inf and sampling fails;
        # like vLLM, sample at MIN_TEMPERATURE instead. 0 stays 0: greedy.
        return MIN_TEMPERATURE if 0 < value < MIN_TEMPERATURE else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo + logprobs scores the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        # An empty prompt has no token to continue from (vLLM refuses it too); the engines would crash on it.
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("the prompt must not be empty")
        return value


class BatchRequest(BaseModel):
    requests: list[ChatCompletionRequest] = Field(min_length=1, max_length=256)


BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions"]


class BatchCreateRequest(BaseModel):
    """`POST /v1/batches` (OpenAI's Batches API)."""

    input_file_id: str = Field(description="A file uploaded with purpose `batch`: one request per JSON line.")
    endpoint: BatchEndpoint = Field(description="The endpoint each request of the file is sent to.")
    completion_window: Literal["24h"] = Field("24h", description="Only `24h`, as OpenAI.")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Up to 16 key-value pairs, kept as given.")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
