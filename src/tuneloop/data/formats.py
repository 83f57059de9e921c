"""The dataset-format taxonomy and normalisation of every format to one conversation shape.

| format              | row shape                                                              |
|---------------------|------------------------------------------------------------------------|
| `alpaca`            | `instruction`, optional `input`, `output`, optional `system`, `history` |
| `sharegpt`          | `conversations: [{from, value}]`, optional `system`                     |
| `messages`          | `messages: [{role, content}]` (OpenAI; content may be a list of parts)  |
| `prompt_completion` | `prompt` + `completion` (or `response`); strings or message lists       |
| `text`              | `text`: plain text, every token trained (continued pre-training)        |
| `preference`        | `chosen` + `rejected` (+ `prompt`, or `conversations`): pairs for DPO/ORPO (`data/preference.py`) |

Every row becomes a `Sample`: a list of messages `{role, content, train}` plus its provenance. A row that does not
fit its format raises `RowError` with a reason (`missing_field` or `malformed`) that lands in quarantine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tuneloop.config import SourceConfig
from tuneloop.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
MESSAGE_ROLES = {"system", "user", "assistant", "tool", "developer"}


class RowError(Exception):
    """A row that cannot be used; `reason` is its quarantine reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    role: str
    content: str
    train: bool = False  # True for assistant turns that carry loss; False keeps a turn as context only


@dataclass
class Sample:
    messages: list[Message]
    kind: str  # "chat" (rendered with the chat template) or "text" (raw text)
    source: str
    row: int
    line: int | None
    raw: Any = None  # the record as read, kept so that quarantine loses nothing

    def text_for_dedup(self) -> str:
        return "\n".join(f"{message.role}: {message.content}" for message in self.messages)


def detect_format(records: Iterable[dict[str, Any]], source: str) -> str:
    """Guess a source's format from the keys of its first rows."""
    keys: Counter[str] = Counter()
    seen = 0
    labels: list[Any] = []
    for record in records:
        if isinstance(record, dict):
            keys.update(record.keys())
            seen += 1
            labels.append(record.get("label"))
    if seen == 0:
        raise DataError(f"{source}: no JSON-object rows to detect the format from", hint="set data.sources[].format")
    present = {key for key, count in keys.items() if count >= max(1, seen // 2)}
    if {"chosen", "rejected"} <= present:
        return "preference"
    if "label" in present and present & {"messages", "completion", "conversations"} and _boolean(labels):
        raise DataError(
            f"{source}: looks like KTO data (one answer per row with a true/false `label`); tuneloop trains on paired "
            "preferences (chosen/rejected), not unpaired KTO labels",
            hint="pair a good and a bad answer to the same prompt as {prompt, chosen, rejected} rows "
            "(train.method: dpo | orpo), or drop the label column and keep the good rows for supervised fine-tuning",
        )
    if "conversations" in present:
        return "sharegpt"
    if "messages" in present:
        return "messages"
    if {"instruction", "output"} <= present:
        return "alpaca"
    if "prompt" in present and present & {"completion", "response"}:
        return "prompt_completion"
    if "text" in present:
        return "text"
    raise DataError(
        f"{source}: cannot detect the format from its columns ({', '.join(sorted(keys)) or 'none'})",
        hint="set data.sources[].format to one of "
        + ", ".join(FORMATS)
        + " and map columns with data.sources[].columns",
    )


def _boolean(values: list[Any]) -> bool:
    present = [value for value in values if value is not None]
    return bool(present) and all(isinstance(value, bool) for value in present)


def prepare_record(record: Any, source_config: SourceConfig) -> dict[str, Any]:
    """Apply the source's column mapping, defaults and value maps to one raw record."""
    if not isinstance(record, dict):
        raise RowError("malformed", f"expected a JSON object, got {type(record).__name__}")
    if source_config.columns:
        record = dict(record)
        for canonical, column in source_config.columns.items():
            if column in record:
                record[canonical] = record.pop(column)
    for key, value in source_config.defaults.items():
        if record.get(key) in (None, ""):
            record = {**record, key: value}
    for key, mapping in source_config.value_map.items():
        if key in record and record[key] is not None and str(record[key]) in mapping:
            record = {**record, key: mapping[str(record[key])]}
    return record


def normalise(record: dict[str, Any], fmt: str, source_config: SourceConfig) -> tuple[list[Message], str]:
    """Turn one prepared record into messages and a kind ("chat" or "text")."""
    if fmt == "alpaca":
        messages = _alpaca(record)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, source_config)
    elif fmt == "messages":
        messages = _messages(record, source_config)
    elif fmt == "prompt_completion":
        messages = _prompt_completion(record)
    elif fmt == "text":
        return [Message("text", _required_text(record, "text"), train=True)], "text"
    else:  # pragma: no cover - the config model only admits known formats
        raise ValueError(fmt)
    if source_config.system and not any(message.role == "system" for message in messages):
        messages.insert(0, Message("system", source_config.system))
    if not any(message.role == "assistant" for message in messages):
        raise RowError("missing_field", "the conversation has no assistant turn to learn from")
    return messages, "chat"


def _required_text(record: dict[str, Any], key: str) -> str:
    if key not in record or record[key] is None:
        raise RowError("missing_field", f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise RowError("malformed", f"field {key!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise RowError("missing_field", f"field {key!r} is empty")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("malformed", f"field {key!r} must be text, got {type(value).__name__}")
    return value


def _alpaca(record: dict[str, Any]) -> list[Message]:
    instruction = _required_text(record, "instruction")
    extra_input = _optional_text(record, "input")
    output = _required_text(record, "output")
    messages: list[Message] = []
    system = _optional_text(record, "system")
    if system.strip():
        messages.append(Message("system", system))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RowError("malformed", "field 'history' must be a list of [question, answer] pairs")
    for turn_number, pair in enumerate(history, start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(item, str) for item in pair)):
            raise RowError("malformed", f"history turn {turn_number} must be a [question, answer] pair of texts")
        messages += [Message("user", pair[0]), Message("assistant", pair[1], train=True)]
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages += [Message("user", user), Message("assistant", output, train=True)]
    return messages


def _sharegpt(record: dict[str, Any], source_config: SourceConfig) -> list[Message]:
    turns = record.get("conversations")
    if turns is None:
        raise RowError("missing_field", "field 'conversations' is missing")
    if not isinstance(turns, list) or not turns:
        raise RowError("malformed", "field 'conversations' must be a non-empty list of turns")
    role_key = source_config.columns.get("role", "from")
    content_key = source_config.columns.get("content", "value")
    messages: list[Message] = []
    system = _optional_text(record, "system")
    if system.strip():
        messages.append(Message("system", system))
    for turn_number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError("malformed", f"turn {turn_number} must be an object with {role_key!r} and {content_key!r}")
        tag = turn.get(role_key, turn.get("role"))
        content = turn.get(content_key, turn.get("content"))
        if tag is None or content is None:
            raise RowError("missing_field", f"turn {turn_number} lacks {role_key!r} or {content_key!r}")
        role = SHAREGPT_ROLES.get(str(tag).lower())
        if role is None:
            raise RowError("malformed", f"turn {turn_number} has unknown role {tag!r}")
        messages.append(Message(role, _content_text(content, turn_number), train=role == "assistant"))
    return messages


def _messages(record: dict[str, Any], source_config: SourceConfig) -> list[Message]:
    turns = record.get("messages")
    if turns is None:
        raise RowError("missing_field", "field 'messages' is missing")
    if not isinstance(turns, list) or not turns:
        raise RowError("malformed", "field 'messages' must be a non-empty list of {role, content}")
    role_key = source_config.columns.get("role", "role")
    content_key = source_config.columns.get("content", "content")
    messages: list[Message] = []
    for turn_number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn:
            raise RowError("missing_field", f"message {turn_number} lacks {role_key!r}")
        role = str(turn[role_key]).lower()
        role = SHAREGPT_ROLES.get(role, role)
        if role not in MESSAGE_ROLES:
            raise RowError("malformed", f"message {turn_number} has unknown role {turn[role_key]!r}")
        content = turn.get(content_key)
        if content is None and turn.get("tool_calls"):
            content = str(turn["tool_calls"])
        if content is None:
            raise RowError("missing_field", f"message {turn_number} lacks {content_key!r}")
        # LLaMA-Factory's per-message loss_weight: 0 keeps an assistant turn as context only.
        weight = turn.get("loss_weight", turn.get("weight", 1))
        messages.append(Message(role, _content_text(content, turn_number), train=role == "assistant" and weight != 0))
    return messages


def _prompt_completion(record: dict[str, Any]) -> list[Message]:
    completion_key = "completion" if "completion" in record else "response"
    prompt, completion = record.get("prompt"), record.get(completion_key)
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        return _messages({"messages": prompt + completion}, SourceConfig(path="-"))
    return [
        Message("user", _required_text(record, "prompt")),
        Message("assistant", _required_text(record, completion_key), train=True),
    ]


def _content_text(content: Any, turn_number: int) -> str:
    """Message content as text: a string, or OpenAI-style parts `[{type: text, text: ...}]`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text":
                texts.append(str(part.get("text", part.get("value", ""))))
            else:
                raise RowError("malformed", f"turn {turn_number} has non-text content (only text is supported)")
        return "".join(texts)
    raise RowError("malformed", f"turn {turn_number} content must be text, got {type(content).__name__}")
