"""Preference data (DPO/ORPO): the row layouts, their normalisation to a pair, and the prepared preference dataset.

Row layouts (TRL's taxonomy, plus LLaMA-Factory's ranking layout), all detected as format `preference`:

| layout             | row shape                                                                              |
|--------------------|----------------------------------------------------------------------------------------|
| standard           | `prompt`: text, `chosen`: text, `rejected`: text                                       |
| conversational     | `prompt`: [messages], `chosen`/`rejected`: [assistant messages] (or one message, or text) |
| implicit prompt    | `chosen`/`rejected`: [whole conversations]; the prompt is their shared beginning        |
| sharegpt ranking   | `conversations`: [{from, value}], `chosen`/`rejected`: {from: gpt, value}, optional `system` |

(`messages` may stand for `prompt`.) Each row becomes a `PreferenceSample`: the prompt messages plus the chosen and
rejected answers. Its `messages` are prompt + chosen, so the quality filters (duplicates over the whole pair, toxicity
over what the model is taught to say) and evaluation (the chosen answer is the reference) treat it like an SFT row.

The prepared dataset keeps the pair rendered with the model's chat template: `prompt` (ending with the generation
prompt), `chosen` and `rejected` (each an assistant turn ending with its end-of-turn token) as text columns, which
TRL's trainers tokenize, and `input_ids`/`labels` of prompt + chosen, so perplexity-based evaluation works as on SFT
data.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.config import SourceConfig
from tuneloop.data.formats import (
    MESSAGE_ROLES,
    SHAREGPT_ROLES,
    Message,
    RowError,
    Sample,
    _content_text,
    _optional_text,
    _sharegpt,
    detect_format,
    prepare_record,
)
from tuneloop.data.render import IGNORE_INDEX, _labels_for
from tuneloop.data.sources import RawRecord, read_records
from tuneloop.errors import ConfigError, DataError
from tuneloop.workspace import DatasetPaths

if TYPE_CHECKING:
    from rich.progress import Progress

    from tuneloop.data.prepare import _Build

PREFERENCE_FORMAT = "preference"
_ENCODE_BATCH = 1024


@dataclass
class PreferenceSample(Sample):
    """A preference pair: `messages` is the prompt followed by the chosen answer; `rejected` the other answer."""

    prompt_size: int = 0  # how many of `messages` are the prompt
    rejected: list[Message] = field(default_factory=list)

    @property
    def prompt(self) -> list[Message]:
        return self.messages[: self.prompt_size]

    @property
    def chosen(self) -> list[Message]:
        return self.messages[self.prompt_size :]

    def text_for_dedup(self) -> str:
        rejected = "\n".join(f"rejected {message.role}: {message.content}" for message in self.rejected)
        return super().text_for_dedup() + "\n" + rejected


def normalise_preference(
    record: dict[str, Any], source_config: SourceConfig
) -> tuple[list[Message], list[Message], list[Message]]:
    """One prepared record -> (prompt, chosen, rejected) messages; RowError naming the field when it does not fit."""
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise RowError("missing_field", f"field {key!r} is missing")
    if "conversations" in record:  # LLaMA-Factory's sharegpt ranking layout
        prompt = _sharegpt(record, source_config)
        chosen = _answer(record, "chosen", source_config)
        rejected = _answer(record, "rejected", source_config)
    elif record.get("prompt") is not None or record.get("messages") is not None:
        key = "prompt" if record.get("prompt") is not None else "messages"
        prompt = _prompt(record, key, source_config)
        chosen = _answer(record, "chosen", source_config)
        rejected = _answer(record, "rejected", source_config)
    else:
        prompt, chosen, rejected = _implicit_prompt(record, source_config)
    if source_config.system and not any(message.role == "system" for message in prompt):
        prompt.insert(0, Message("system", source_config.system))
    if not prompt:
        raise RowError("missing_field", "the pair has no prompt (field 'prompt' is empty)")
    if [(m.role, m.content) for m in chosen] == [(m.role, m.content) for m in rejected]:
        raise RowError("malformed", "fields 'chosen' and 'rejected' hold the same answer: nothing to prefer")
    return prompt, chosen, rejected


def _prompt(record: dict[str, Any], key: str, source_config: SourceConfig) -> list[Message]:
    value = record[key]
    messages: list[Message] = []
    system = _optional_text(record, "system")
    if system.strip():
        messages.append(Message("system", system))
    if isinstance(value, str):
        if not value.strip():
            raise RowError("missing_field", f"field {key!r} is empty")
        return [*messages, Message("user", value)]
    if not isinstance(value, list) or not value:
        raise RowError("malformed", f"field {key!r} must be text or a non-empty list of {{role, content}} messages")
    return messages + _message_list(value, key, source_config)


def _answer(record: dict[str, Any], key: str, source_config: SourceConfig) -> list[Message]:
    """`chosen`/`rejected`: text, one message (dict, as LLaMA-Factory writes it) or a list of assistant messages."""
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise RowError("missing_field", f"field {key!r} is empty")
        return [Message("assistant", value, train=True)]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError("malformed", f"field {key!r} must be text, a message, or a non-empty list of messages")
    messages = _message_list(value, key, source_config)
    if messages[-1].role != "assistant":
        raise RowError("malformed", f"field {key!r} must end with an assistant message, not {messages[-1].role!r}")
    if not messages[-1].content.strip():
        raise RowError("missing_field", f"field {key!r} has an empty answer")
    return messages


def _implicit_prompt(
    record: dict[str, Any], source_config: SourceConfig
) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's implicit-prompt layout: two whole conversations; the prompt is the turns they share."""
    conversations = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if not isinstance(value, list) or not value:
            raise RowError(
                "missing_field",
                f"field 'prompt' is missing and field {key!r} is not a conversation (a list of messages) to take "
                "the prompt from",
            )
        conversations.append(_message_list(value, key, source_config))
    chosen, rejected = conversations
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and (chosen[shared].role, chosen[shared].content) == (
        rejected[shared].role,
        rejected[shared].content,
    ):
        shared += 1
    if shared == 0:
        raise RowError("malformed", "fields 'chosen' and 'rejected' share no opening turns to use as the prompt")
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1].role != "assistant":
            raise RowError("malformed", f"field {key!r} must end with an assistant message")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _message_list(turns: list[Any], key: str, source_config: SourceConfig) -> list[Message]:
    """Messages in OpenAI form (`role`/`content`) or ShareGPT form (`from`/`value`)."""
    role_key = source_config.columns.get("role", "role")
    content_key = source_config.columns.get("content", "content")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError("malformed", f"field {key!r}: message {number} must be an object with role and content")
        tag = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if tag is None:
            raise RowError("missing_field", f"field {key!r}: message {number} lacks {role_key!r}")
        if content is None:
            raise RowError("missing_field", f"field {key!r}: message {number} lacks {content_key!r}")
        role = SHAREGPT_ROLES.get(str(tag).lower(), str(tag).lower())
        if role not in MESSAGE_ROLES:
            raise RowError("malformed", f"field {key!r}: message {number} has unknown role {tag!r}")
        messages.append(Message(role, _content_text(content, number), train=role == "assistant"))
    return messages


def source_kinds(sources: list[SourceConfig], paths: list[Path], sample_rows: int = 200) -> list[str]:
    """Each source's format (`preference` or an SFT format), from its configured format or its first rows."""
    kinds = []
    for source, path in zip(sources, paths, strict=True):
        if source.format != "auto":
            kinds.append(source.format)
            continue
        rows = []
        for record in read_records(path, source.split, min(sample_rows, source.limit or sample_rows)):
            if record.error is None:
                try:
                    rows.append(prepare_record(record.data, source))
                except RowError:
                    continue
        kinds.append(detect_format(rows, str(path)))
    return kinds


def check_not_mixed(sources: list[SourceConfig], kinds: list[str]) -> bool:
    """Whether the sources are preference data; a mix of preference and SFT sources is a ConfigError naming them."""
    preference = [source.path for source, kind in zip(sources, kinds, strict=True) if kind == PREFERENCE_FORMAT]
    supervised = [
        f"{source.path} ({kind})" for source, kind in zip(sources, kinds, strict=True) if kind != PREFERENCE_FORMAT
    ]
    if preference and supervised:
        raise ConfigError(
            "data.sources mixes preference pairs ("
            + ", ".join(preference)
            + ") with supervised rows ("
            + ", ".join(supervised)
            + "): one dataset trains one way",
            hint="prepare them as two configs: the supervised sources for an SFT run (train.method: lora), the "
            "preference sources for `train.method: dpo | orpo` with train.preference.parent set to that run",
        )
    return bool(preference)


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The sidecar provenance a generator wrote next to a data file (`FILE.provenance.json` or
    `STEM.provenance.json`): what made the rows (feedback window, teacher, ...), carried into the manifest and
    registry lineage as it is."""
    for candidate in (path.with_name(path.name + ".provenance.json"), path.with_name(path.stem + ".provenance.json")):
        if candidate.is_file():
            try:
                value = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{candidate}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
            return value if isinstance(value, dict) else {"value": value}
    return None


@dataclass
class RenderedPair:
    prompt: str  # ends with the generation prompt; no leading BOS when the tokenizer adds one itself
    chosen: str
    rejected: str
    input_ids: list[int]  # prompt + chosen, for perplexity evaluation
    labels: list[int]
    prompt_tokens: int
    pair_tokens: int  # the longer of prompt + chosen and prompt + rejected

    @property
    def num_trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class PairRenderer:
    """Renders pairs with the tokenizer's chat template: the answers are what the template adds after the prompt's
    generation prompt, trimmed after the end-of-turn token (TRL appends EOS to an answer that lacks it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        self.strip_bos = bos if adds_bos else None

    def render(self, sample: PreferenceSample) -> tuple[str, str, str]:
        prompt = self._template(sample.prompt, add_generation_prompt=True)
        answers = []
        for answer in (sample.chosen, sample.rejected):
            full = self._template(sample.prompt + answer)
            if not full.startswith(prompt):
                raise RowError(
                    "render_error", "the chat template does not render the prompt as the start of prompt + answer"
                )
            text = full[len(prompt) :]
            if self.eos and text.rstrip().endswith(self.eos):
                text = text.rstrip()
            answers.append(text)
        return prompt, answers[0], answers[1]

    def encode(self, texts: list[tuple[str, str, str]]) -> list[RenderedPair]:
        tokenizer = self.tokenizer
        prompts = tokenizer([p for p, _, _ in texts], add_special_tokens=False)["input_ids"]
        chosen = tokenizer([p + c for p, c, _ in texts], add_special_tokens=False, return_offsets_mapping=True)
        rejected = tokenizer([p + r for p, _, r in texts], add_special_tokens=False)["input_ids"]
        pairs = []
        for index, (prompt, answer, other) in enumerate(texts):
            ids = list(chosen["input_ids"][index])
            labels = _labels_for(ids, chosen["offset_mapping"][index], [(len(prompt), len(prompt + answer))])
            if self.strip_bos and prompt.startswith(self.strip_bos):
                prompt = prompt[len(self.strip_bos) :]
            pairs.append(
                RenderedPair(
                    prompt,
                    answer,
                    other,
                    ids,
                    labels,
                    len(prompts[index]),
                    max(len(ids), len(rejected[index])),
                )
            )
        return pairs

    def _template(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # a template may reject a role order or a role it does not know
            raise RowError("render_error", f"the chat template rejected this conversation: {exc}") from exc


def build_preference(build: _Build, source_paths: list[Path], out: DatasetPaths) -> dict[str, Any]:
    """The preference variant of `prepare._Build.run`: read pairs, filter, render, split, write; the manifest's fields."""
    from tuneloop.data.filters import Rejection

    with build._progress() as progress:
        samples, sources_info = _read_pairs(build, source_paths, progress)
        samples = build._filter(samples, progress)
        rendered = _render_pairs(build, samples, progress, Rejection)
    train, val = build._split(rendered)
    _write(out, train, val)
    build._write_quarantine(out)
    kept = train + val
    lengths = [pair.pair_tokens for _, pair in kept]
    build.token_lengths = lengths
    if kept:
        sample, pair = kept[0]
        build.sample_for_report = {
            "source": sample.source,
            "line": sample.line,
            "tokens": [build.tokenizer.decode([token]) for token in pair.input_ids],
            "trained": [label != IGNORE_INDEX for label in pair.labels],
        }
    from tuneloop.data.prepare import FILTER_REASONS, _percentile

    tokenizer = build.tokenizer
    return {
        "kind": "preference",
        "sources": sources_info,
        "counts": {
            "rows_read": sum(info["rows_read"] for info in sources_info),
            "kept": len(kept),
            "train_rows": len(train),
            "val_rows": len(val),
            "train_samples": len(train),
            "quarantined": len(build.quarantine),
            "filtered": {reason: build.filtered.get(reason, 0) for reason in FILTER_REASONS},
        },
        "tokens": {
            "total": sum(lengths),
            "trainable": sum(pair.num_trainable for _, pair in kept),
            "max": max(lengths, default=0),
            "mean": round(statistics.fmean(lengths), 1) if lengths else 0,
            "p50": _percentile(lengths, 50),
            "p95": _percentile(lengths, 95),
            "truncated_rows": sum(1 for _, pair in kept if pair.pair_tokens > build.data.max_seq_len),
        },
        "packing": {"enabled": False, "max_seq_len": build.data.max_seq_len, "efficiency": None, "length": None},
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
            "pad_equals_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
        },
        "train_on": "assistant",
    }


def _read_pairs(
    build: _Build, source_paths: list[Path], progress: Progress
) -> tuple[list[Sample], list[dict[str, Any]]]:
    samples: list[Sample] = []
    info = []
    for source_config, path in zip(build.data.sources, source_paths, strict=True):
        task = progress.add_task(f"read {path.name}", total=None)
        records = list(read_records(path, source_config.split, source_config.limit))
        before = len(samples)
        for record in records:
            sample = _pair_or_reject(build, record, source_config)
            if sample is not None:
                samples.append(sample)
        progress.update(task, total=len(records), completed=len(records))
        build.console.print(f"[cyan]{path.name}[/]: format [bold]{PREFERENCE_FORMAT}[/]")
        info.append(
            {
                "path": str(path),
                "configured_path": source_config.path,
                "format": PREFERENCE_FORMAT,
                "rows_read": len(records),
                "rows_usable": len(samples) - before,
                "provenance": read_provenance(path) if path.is_file() else None,
            }
        )
    return samples, info


def _pair_or_reject(build: _Build, record: RawRecord, source_config: SourceConfig) -> PreferenceSample | None:
    if record.error is not None:
        build._reject(record, "malformed", record.error)
        return None
    try:
        row = prepare_record(record.data, source_config)
        prompt, chosen, rejected = normalise_preference(row, source_config)
    except RowError as error:
        build._reject(record, error.reason, error.detail)
        return None
    return PreferenceSample(
        prompt + chosen,
        "chat",
        record.source,
        record.row,
        record.line,
        raw=record.data,
        prompt_size=len(prompt),
        rejected=rejected,
    )


def _render_pairs(
    build: _Build, samples: list[Sample], progress: Progress, rejection: Any
) -> list[tuple[PreferenceSample, RenderedPair]]:
    renderer = PairRenderer(build.tokenizer)
    filters, data = build.data.filters, build.data
    max_tokens = filters.max_tokens or (None if data.truncation else data.max_seq_len)
    task = progress.add_task("render + tokenize pairs", total=len(samples))
    kept: list[tuple[PreferenceSample, RenderedPair]] = []
    for start in range(0, len(samples), _ENCODE_BATCH):
        batch: list[tuple[PreferenceSample, tuple[str, str, str]]] = []
        for sample in samples[start : start + _ENCODE_BATCH]:
            assert isinstance(sample, PreferenceSample)
            try:
                batch.append((sample, renderer.render(sample)))
            except RowError as error:
                build._reject_samples([rejection(sample, error.reason, error.detail)])
        for (sample, _), pair in zip(batch, renderer.encode([texts for _, texts in batch]), strict=True):
            if pair.pair_tokens < filters.min_tokens:
                reason, detail = "too_short", f"{pair.pair_tokens} tokens < min_tokens={filters.min_tokens}"
            elif max_tokens is not None and pair.pair_tokens > max_tokens:
                reason, detail = "too_long", f"{pair.pair_tokens} tokens (prompt + longer answer) > {max_tokens}"
            elif pair.prompt_tokens >= data.max_seq_len:
                reason, detail = "too_long", f"the prompt alone has {pair.prompt_tokens} tokens >= max_seq_len"
            else:
                kept.append((sample, pair))
                continue
            build._reject_samples([rejection(sample, reason, detail)])
        progress.update(task, completed=min(start + _ENCODE_BATCH, len(samples)))
    return kept


def _write(
    out: DatasetPaths,
    train: list[tuple[PreferenceSample, RenderedPair]],
    val: list[tuple[PreferenceSample, RenderedPair]],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("source", pa.string()),
            ("row", pa.int64()),
        ]
    )
    for split, pairs in (("train", train), ("val", val)):
        table = pa.table(
            {
                "prompt": [pair.prompt for _, pair in pairs],
                "chosen": [pair.chosen for _, pair in pairs],
                "rejected": [pair.rejected for _, pair in pairs],
                "input_ids": [pair.input_ids for _, pair in pairs],
                "labels": [pair.labels for _, pair in pairs],
                "source": [sample.source for sample, _ in pairs],
                "row": [sample.row for sample, _ in pairs],
            },
            schema=schema,
        )
        pq.write_table(table, out.parquet(split))
        with out.conversations(split).open("w", encoding="utf-8") as handle:
            for sample, _ in pairs:
                row = {
                    # prompt + chosen: evaluation takes the chosen answer as the reference
                    "messages": [{"role": m.role, "content": m.content} for m in sample.messages],
                    "rejected": [{"role": m.role, "content": m.content} for m in sample.rejected],
                    "kind": "chat",
                    "source": sample.source,
                    "line": sample.line,
                    "row": sample.row,
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
