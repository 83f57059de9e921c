from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneloop.data.formats import Message, Sample
from tuneloop.data.render import IGNORE_INDEX, ChatRenderer, truncate
from tuneloop.models import apply_chat_template_choice


def chat(*turns: tuple[str, str, bool]) -> Sample:
    return Sample([Message(role, content, train) for role, content, train in turns], "chat", "mem", 1, 1)


def trained_text(tokenizer, rendered) -> str:
    return tokenizer.decode(
        [t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE_INDEX]
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_loss_only_on_assistant_turns_including_their_end_marker(tokenizer) -> None:
    sample = chat(
        ("system", "Be brief.", False),
        ("user", "hello", False),
        ("assistant", "world", True),
        ("user", "again", False),
        ("assistant", "done", True),
    )
    rendered = ChatRenderer(tokenizer).render(sample)
    assert rendered.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert trained_text(tokenizer, rendered) == "world<|im_end|>\ndone<|im_end|>\n"
    assert "hello" not in trained_text(tokenizer, rendered)


def test_context_only_assistant_turn_is_masked(tokenizer) -> None:
    sample = chat(
        ("user", "a", False), ("assistant", "skip me", False), ("user", "b", False), ("assistant", "learn", True)
    )
    assert trained_text(tokenizer, ChatRenderer(tokenizer).render(sample)) == "learn<|im_end|>\n"


def test_eos_is_labelled_even_though_pad_equals_eos(tokenizer) -> None:
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test guards against
    rendered = ChatRenderer(tokenizer).render(chat(("user", "q", False), ("assistant", "a", True)))
    eos_positions = [i for i, token in enumerate(rendered.input_ids) if token == tokenizer.eos_token_id]
    assert rendered.labels[eos_positions[-1]] == tokenizer.eos_token_id


def test_train_on_all(tokenizer) -> None:
    rendered = ChatRenderer(tokenizer, train_on="all").render(chat(("user", "q", False), ("assistant", "a", True)))
    assert rendered.labels == rendered.input_ids


def test_chatml_fallback_and_appended_eos(tiny_tokenizer_no_template: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_no_template)
    assert apply_chat_template_choice(tokenizer, None) == "chatml-fallback"
    tokenizer.eos_token = "<|endoftext|>"  # a base model whose EOS is not the ChatML end-of-turn
    rendered = ChatRenderer(tokenizer).render(chat(("user", "q", False), ("assistant", "a", True)))
    assert rendered.input_ids[-1] == tokenizer.eos_token_id
    assert rendered.labels[-1] == tokenizer.eos_token_id


def test_text_samples_train_every_token_and_end_with_eos(tokenizer) -> None:
    rendered = ChatRenderer(tokenizer).render(Sample([Message("text", "plain words", True)], "text", "m", 1, 1))
    assert rendered.labels == rendered.input_ids
    assert rendered.input_ids[-1] == tokenizer.eos_token_id


def test_truncate() -> None:
    from tuneloop.data.render import Rendered

    cut = truncate(Rendered("t", [1, 2, 3, 4], [-100, 2, 3, 4]), 3)
    assert cut.input_ids == [1, 2, 3] and cut.labels == [-100, 2, 3] and cut.truncated


def test_shape_fast_path_matches_the_template_and_falls_back_when_content_is_transformed(tokenizer) -> None:
    samples = [
        chat(("system", f"S{i}", False), ("user", f"question {i}  ", False), ("assistant", f" answer {i} ", True))
        for i in range(12)
    ]
    renderer = ChatRenderer(tokenizer)
    for sample in samples:
        assert renderer.render_text(sample) == renderer._render_slow(sample.messages)
    trimming = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    trimming.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    trimming_renderer = ChatRenderer(trimming)
    for sample in samples:
        rendered = trimming_renderer.render_text(sample)
        assert rendered == trimming_renderer._render_slow(sample.messages)
        assert "answer" in rendered.text[rendered.spans[0][0] : rendered.spans[0][1]]
