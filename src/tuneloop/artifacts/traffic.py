"""The gateway's JSON Lines logs that `tuneloop data from-feedback` reads: the traffic log (`serve/traffic.jsonl`,
one line per served response when `serve.log_traffic` is on) and the ratings posted to /v1/feedback
(`serve/feedback.jsonl`).

The gateway writes them (it must not import `data`) and `data.feedback_pairs` reads them (it must not import
`serve`), so their record types, the one appender and the tolerant reader live here, once.

A traffic line: `response_id` (the id the client got, the one /v1/feedback rates), `time`, `model` (asked for: a
route or a served model), `variant` (the A/B variant a route picked, else null), `served` (the model that answered),
`endpoint` (`chat.completions` | `completions`), `stream`, `passthrough` (the engine's own events were forwarded),
`messages` (chat) or `prompt` (completions), `answer` (choice 0), `other_choices` (choices 1.. when `n` > 1),
`finish_reason`, `prompt_tokens`, `completion_tokens`.

`PreferenceProvenance` is what `from-feedback` writes beside its rows (`OUT.provenance.json`): the feedback window,
the counts (joined, paired, dropped and why), the variants and the source files with their hashes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.artifacts._json import ArtifactPart, JsonArtifact

Endpoint = Literal["chat.completions", "completions"]
SourceKind = Literal["feedback", "traffic", "ratings", "outputs"]

_append_lock = threading.Lock()


class TrafficRecord(BaseModel):
    """One served response, as the client received it."""

    model_config = ConfigDict(extra="ignore")

    response_id: str
    time: float
    model: str = Field(description="The model the client asked for: an A/B route or a served model.")
    variant: str | None = Field(None, description="The A/B variant the route picked; None outside routes.")
    served: str = Field(description="The served model that answered.")
    endpoint: Endpoint
    stream: bool = False
    passthrough: bool = False
    messages: list[dict[str, Any]] | None = Field(None, description="The chat prompt: [{role, content}].")
    prompt: str | None = Field(None, description="The text prompt of /v1/completions.")
    answer: str
    other_choices: list[str] = Field(default_factory=list, description="Choices 1.. of a request with n > 1.")
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FeedbackEntry(BaseModel):
    """One rating posted to /v1/feedback (a line of `serve/feedback.jsonl`): `rating` is `up`, `down` or 1-5."""

    model_config = ConfigDict(extra="ignore")

    time: float
    response_id: str
    model: str
    variant: str | None = None
    rating: str | int
    positive: bool
    comment: str | None = None


Record = TypeVar("Record", bound=BaseModel)


@dataclass
class JsonlRead(Generic[Record]):
    """The valid records of one JSON Lines file and where the others were (`file:line: why`)."""

    path: Path
    records: list[Record] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    lines: int = 0


@dataclass
class JsonlLine(Generic[Record]):
    """One non-blank line: its record, or why it is not one (`file:line: why`); `size` in bytes, for progress."""

    size: int
    record: Record | None = None
    malformed: str | None = None


def scan_jsonl(path: Path, kind: type[Record]) -> Iterator[JsonlLine[Record]]:
    """The lines of `path` one at a time (a traffic log may be larger than memory), each validated as `kind`; an
    invalid line is reported, never raised (a log may end with half a line when its writer was killed mid-append)."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield JsonlLine(len(line), record=kind.model_validate_json(line))
            except ValidationError as error:
                yield JsonlLine(len(line), malformed=f"{path}:{number}: {_first_error(error)}")


def read_jsonl(path: Path, kind: type[Record]) -> JsonlRead[Record]:
    """Every line of `path` that is a valid `kind`; the others are named in `malformed`."""
    read: JsonlRead[Record] = JsonlRead(path)
    for line in scan_jsonl(path, kind):
        read.lines += 1
        if line.record is not None:
            read.records.append(line.record)
        else:
            read.malformed.append(line.malformed or "")
    return read


def append_traffic(path: Path, record: TrafficRecord) -> None:
    """One more line, written with one `write` on a file opened for appending: lines of this process's threads never
    interleave (the lock), nor those of other processes on the same host (O_APPEND)."""
    line = record.model_dump_json(exclude_none=True).encode() + b"\n"
    with _append_lock:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # prompts: readable by the owner
        try:
            # A crash mid-append can leave a last line without its newline: this one must not be glued onto it.
            size = os.fstat(descriptor).st_size
            glued = size > 0 and os.pread(descriptor, 1, size - 1) != b"\n"
            os.write(descriptor, (b"\n" if glued else b"") + line)
        finally:
            os.close(descriptor)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return message if len(message) <= 160 else message[:157] + "..."


class SourceFile(ArtifactPart):
    path: str
    kind: SourceKind
    sha256: str
    lines: int = 0
    malformed: int = 0


class FeedbackWindow(ArtifactPart):
    since: str | None = Field(None, description="--since (ISO 8601, UTC), inclusive.")
    until: str | None = Field(None, description="--until (ISO 8601, UTC), exclusive.")
    first_rating: str | None = Field(None, description="The earliest rating used.")
    last_rating: str | None = Field(None, description="The latest rating used.")


class PreferenceProvenance(JsonArtifact):
    """Where a preference file made by `tuneloop data from-feedback` came from (`OUT.provenance.json`)."""

    created: str
    rows: int
    rule: str = Field(description="How chosen and rejected were decided, in words.")
    window: FeedbackWindow
    counts: dict[str, int] = Field(description="ratings read, in the window, joined to traffic, prompts, pairs.")
    dropped: dict[str, int] = Field(description="What was left out and why (ratings, responses, prompts or pairs).")
    variants: list[str] = Field(description="The models/variants whose answers are in the rows.")
    sources: list[SourceFile]
    malformed_lines: list[str] = Field(default_factory=list, description="The first skipped lines, as file:line.")
