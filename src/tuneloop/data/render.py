"""Rendering samples with the chat template and computing the loss mask.

Which characters belong to an assistant turn is found by rendering prefixes: turn i spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i+1])`, so the turn's own
end-of-turn marker (`<|im_end|>` for ChatML) is trained and the model learns to stop. Templates whose renders are not
prefix-stable fall back to locating the answer text itself. Tokens are then labelled by their character offsets.

Labels follow the Hugging Face convention (unshifted; -100 = no loss). The EOS token always carries loss: when the
template does not put one inside the last trained turn, it is appended. Padding is masked by position (attention),
never by token id, so a tokenizer whose pad token equals EOS still learns to emit EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneloop.data.formats import Message, RowError, Sample

IGNORE_INDEX = -100


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class RenderedText:
    """A sample rendered to text, with the character spans that carry loss (None: every token)."""

    text: str
    spans: list[tuple[int, int]] | None
    add_special_tokens: bool = False


class ChatRenderer:
    """Renders samples for one tokenizer; `train_on` is "assistant" or "all"."""

    def __init__(self, tokenizer: Any, train_on: str = "assistant") -> None:
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.eos_id: int | None = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; set one before preparing data")
        self._shapes: dict[tuple[tuple[str, bool], ...], _Shape | None] = {}

    def render(self, sample: Sample) -> Rendered:
        """Render and tokenize one sample (see `encode` for many at once)."""
        return self.encode([self.render_text(sample)])[0]

    def render_text(self, sample: Sample) -> RenderedText:
        if sample.kind == "text":
            return RenderedText(sample.messages[0].content, None, add_special_tokens=True)
        fast = self._render_by_shape(sample.messages)
        if fast is not None:
            return fast
        return self._render_slow(sample.messages)

    def _render_slow(self, messages: list[Message]) -> RenderedText:
        as_dicts = [{"role": message.role, "content": message.content} for message in messages]
        text = self._template(as_dicts)
        spans = None if self.train_on == "all" else self._trained_spans(messages, as_dicts, text)
        return RenderedText(text, spans)

    def _render_by_shape(self, messages: list[Message]) -> RenderedText | None:
        """Fast path: render each conversation *shape* (roles, trained flags) once with placeholder contents, then
        fill in each row's texts by string substitution. Rendering every row through Jinja (twice, for the loss
        spans) dominated preparation time. A shape is trusted only after its first rows matched the real render;
        templates that transform content (trim, content-dependent branches) fail that check and stay on the slow
        path."""
        if any(_PLACEHOLDER_START in message.content for message in messages):
            return None
        key = tuple((message.role, message.train) for message in messages)
        if key not in self._shapes:
            self._shapes[key] = _Shape.build(self, messages)
        shape = self._shapes[key]
        if shape is None:
            return None
        fast = shape.fill([message.content for message in messages])
        if shape.checks_left > 0:
            shape.checks_left -= 1
            slow = self._render_slow(messages)
            if (slow.text, slow.spans) != (fast.text, fast.spans):
                self._shapes[key] = None
                return slow
        return fast

    def encode(self, items: list[RenderedText]) -> list[Rendered]:
        """Tokenize rendered texts in one batch call (the Rust tokenizer runs it in parallel) and label them."""
        results: list[Rendered | None] = [None] * len(items)
        for add_special in (False, True):
            chosen = [index for index, item in enumerate(items) if item.add_special_tokens == add_special]
            if not chosen:
                continue
            encoded = self.tokenizer(
                [items[index].text for index in chosen],
                add_special_tokens=add_special,
                return_offsets_mapping=True,
            )
            for batch_position, index in enumerate(chosen):
                input_ids = list(encoded["input_ids"][batch_position])
                labels = _labels_for(input_ids, encoded["offset_mapping"][batch_position], items[index].spans)
                results[index] = self._with_eos(Rendered(items[index].text, input_ids, labels))
        return [result for result in results if result is not None]

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # a template may reject a role order or a role it does not know
            raise RowError("render_error", f"the chat template rejected this conversation: {exc}") from exc

    def _trained_spans(
        self, messages: list[Message], as_dicts: list[dict[str, str]], text: str
    ) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        cursor = 0
        for index, message in enumerate(messages):
            if message.role != "assistant" or not message.train:
                continue
            prompt = self._template(as_dicts[:index], add_generation_prompt=True) if index else ""
            through = text if index == len(messages) - 1 else self._template(as_dicts[: index + 1])
            if text.startswith(through) and through.startswith(prompt) and len(through) > len(prompt):
                spans.append((len(prompt), len(through)))
                cursor = len(through)
                continue
            # Not prefix-stable (e.g. templates that rewrite earlier turns): locate the answer text itself.
            found = text.find(message.content, cursor)
            if found < 0:
                raise RowError("render_error", f"could not locate assistant turn {index + 1} in the rendered text")
            spans.append((found, found + len(message.content)))
            cursor = found + len(message.content)
        return spans

    def _with_eos(self, rendered: Rendered) -> Rendered:
        """Make sure an EOS carries loss at the end of the last trained turn."""
        trained = [position for position, label in enumerate(rendered.labels) if label != IGNORE_INDEX]
        if not trained:
            return rendered
        last_turn_start = trained[-1]
        while last_turn_start > 0 and rendered.labels[last_turn_start - 1] != IGNORE_INDEX:
            last_turn_start -= 1
        if self.eos_id in rendered.labels[last_turn_start:]:
            return rendered
        rendered.input_ids.append(self.eos_id)
        rendered.labels.append(self.eos_id)
        rendered.text += self.tokenizer.eos_token or ""
        return rendered


_PLACEHOLDER_START, _PLACEHOLDER_END = "\ue000", "\ue001"
_SPAN_START, _SPAN_END = "\ue002", "\ue003"
_PART = re.compile(r"(\ue000\d+\ue001|\ue002|\ue003)")


@dataclass
class _Shape:
    """A chat template rendered once for one conversation shape: literal pieces, content slots and span marks."""

    parts: list[str | int]  # literal text, or the index of the message whose content goes there; -1/-2: span start/end
    trained: bool
    checks_left: int = 8

    @classmethod
    def build(cls, renderer: ChatRenderer, messages: list[Message]) -> _Shape | None:
        stand_ins = [
            Message(message.role, f"{_PLACEHOLDER_START}{index}{_PLACEHOLDER_END}", message.train)
            for index, message in enumerate(messages)
        ]
        try:
            rendered = renderer._render_slow(stand_ins)
        except RowError:
            return None
        text = rendered.text
        marked = text
        for start, end in reversed(rendered.spans or []):
            marked = marked[:start] + _SPAN_START + marked[start:end] + _SPAN_END + marked[end:]
        parts: list[str | int] = []
        for piece in _PART.split(marked):
            if not piece:
                continue
            if piece == _SPAN_START:
                parts.append(-1)
            elif piece == _SPAN_END:
                parts.append(-2)
            elif piece.startswith(_PLACEHOLDER_START):
                parts.append(int(piece[1:-1]))
            else:
                parts.append(piece)
        if sum(1 for part in parts if isinstance(part, int) and part >= 0) != len(messages):
            return None  # the template dropped or repeated a message: not a plain substitution
        return cls(parts, trained=rendered.spans is not None)

    def fill(self, contents: list[str]) -> RenderedText:
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        position = 0
        span_start = 0
        for part in self.parts:
            if isinstance(part, str):
                pieces.append(part)
                position += len(part)
            elif part == -1:
                span_start = position
            elif part == -2:
                spans.append((span_start, position))
            else:
                pieces.append(contents[part])
                position += len(contents[part])
        return RenderedText("".join(pieces), spans if self.trained else None)


def _labels_for(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]] | None) -> list[int]:
    """Label the tokens whose first character lies inside a trained span."""
    if spans is None:
        return list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start and end > start:
            labels[position] = input_ids[position]
    return labels


def truncate(rendered: Rendered, max_len: int) -> Rendered:
    """Cut to `max_len` tokens (the end of an over-long row is lost; its EOS with it)."""
    if len(rendered.input_ids) <= max_len:
        return rendered
    return Rendered(rendered.text, rendered.input_ids[:max_len], rendered.labels[:max_len], truncated=True)
