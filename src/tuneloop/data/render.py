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

    def render(self, sample: Sample) -> Rendered:
        """Render and tokenize one sample (see `encode` for many at once)."""
        return self.encode([self.render_text(sample)])[0]

    def render_text(self, sample: Sample) -> RenderedText:
        if sample.kind == "text":
            return RenderedText(sample.messages[0].content, None, add_special_tokens=True)
        as_dicts = [{"role": message.role, "content": message.content} for message in sample.messages]
        text = self._template(as_dicts)
        spans = None if self.train_on == "all" else self._trained_spans(sample.messages, as_dicts, text)
        return RenderedText(text, spans)

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
