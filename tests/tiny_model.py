"""A tiny, randomly initialised Llama model with a real byte-level BPE tokenizer, built locally (no hub).

Used by fast tests: it has a ChatML chat template, and its pad token equals its EOS token on purpose (as SmolLM2's
does), so tests can check that EOS labels survive padding.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Extract the order from the message. Answer with one line of JSON.",
    "user assistant system tool hello world instruction input output",
    '{"name": "Maria Lopez", "city": "Valencia", "quantity": 3, "date": "2024-05-12"}',
    "Classify the sentiment of the sentence as positive or negative.",
    "What is the capital of France? Paris is the capital of France.",
    "0123456789 January February March April May June July August",
]


def build_tiny_tokenizer(path: Path, chat_template: str | None = CHATML) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        wrapped.chat_template = chat_template
    path.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(path)
    return path


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Tokenizer + a 2-layer Llama (hidden 64) with random weights, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def save_random_lora(
    base_folder: Path,
    out: Path,
    r: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    alpha: int | None = None,
    seed: int = 0,
) -> Path:
    """A LoRA adapter with random (non-zero) weights on `base_folder`, saved with the base's tokenizer: an adapter
    that changes outputs, without training one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)  # the same adapter every run: tests may rely on how it changes answers
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_folder),
        LoraConfig(r=r, lora_alpha=alpha or r, target_modules=list(target_modules), init_lora_weights=False),
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(out)
    return out
