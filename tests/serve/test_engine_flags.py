"""The serve optimisations as engine flags: what `llama_server_arguments` and `vllm_arguments` build from each field,
the combinations refused with the field named, the dtype vLLM gets, and (slow) the real engines taking the flags:
vLLM's own argument parser and engine config, llama-server behind `tuneloop serve` answering with them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.servers import start_serve, wait_ready
from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve.bench import default_prompts
from tuneloop.serve.engines.llamacpp import LlamaCppEngine, llama_server_arguments
from tuneloop.serve.engines.optimisations import cpu_runs_fp8_kv_cache
from tuneloop.serve.engines.precision import VLLM_DTYPES, serving_precision
from tuneloop.serve.engines.vllm import VllmEngine, vllm_arguments

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PROBE = Path(__file__).with_name("vllm_config_probe.py")


def llama_flags(**fields: Any) -> list[str]:
    return llama_server_arguments(ServeConfig(**fields), "m", "m.gguf", [], 512, threads=2, chat_template=None)


def vllm_flags(*, for_this_machine: bool = False, **fields: Any) -> list[str]:
    settings = ServeConfig(**fields)
    return vllm_arguments(settings, "m", "/m", {}, 8, 512, None, for_this_machine=for_this_machine)


def value_after(flags: list[str], flag: str) -> str:
    return flags[flags.index(flag) + 1]


def test_llamacpp_defaults_leave_the_optimisations_to_llama_server() -> None:
    flags = llama_flags()
    for flag in ("--cache-type-k", "--cache-type-v", "--flash-attn", "--no-cache-prompt", "--spec-type"):
        assert flag not in flags, flag


def test_llamacpp_kv_cache_type_and_flash_attention_for_a_quantised_v_cache() -> None:
    quantised = llama_flags(kv_cache_dtype="q8_0")
    assert value_after(quantised, "--cache-type-k") == value_after(quantised, "--cache-type-v") == "q8_0"
    assert value_after(quantised, "--flash-attn") == "on"  # llama.cpp refuses a quantised V cache without it
    assert value_after(llama_flags(kv_cache_dtype="q4_0"), "--cache-type-v") == "q4_0"
    half = llama_flags(kv_cache_dtype="bf16")
    assert value_after(half, "--cache-type-k") == "bf16" and "--flash-attn" not in half


def test_llamacpp_prefix_caching_off_and_speculative_decoding() -> None:
    assert "--no-cache-prompt" in llama_flags(prefix_caching=False)
    ngram = llama_flags(speculative={"method": "ngram", "num_tokens": 6, "ngram_size": 2})
    assert value_after(ngram, "--spec-type") == "ngram-simple"
    assert value_after(ngram, "--spec-ngram-simple-size-n") == "2"
    assert value_after(ngram, "--spec-ngram-simple-size-m") == "6"
    draft = llama_flags(speculative={"method": "draft", "draft_model": "/d.gguf", "num_tokens": 5})
    assert value_after(draft, "--spec-type") == "draft-simple"
    assert value_after(draft, "--model-draft") == "/d.gguf" and value_after(draft, "--spec-draft-n-max") == "5"
    assert value_after(llama_flags(llamacpp_parallel=32), "--parallel") == "32"


def test_vllm_optimisation_flags() -> None:
    assert "--enable-prefix-caching" in vllm_flags() and "--no-enable-prefix-caching" in vllm_flags(
        prefix_caching=False
    )
    assert "--kv-cache-dtype" not in vllm_flags() and "--speculative-config" not in vllm_flags()
    assert value_after(vllm_flags(kv_cache_dtype="fp8_e5m2"), "--kv-cache-dtype") == "fp8_e5m2"
    assert value_after(vllm_flags(kv_cache_dtype="bf16"), "--kv-cache-dtype") == "bfloat16"  # for a GPU image
    assert value_after(vllm_flags(max_num_seqs=32), "--max-num-seqs") == "32" and "--max-num-seqs" not in vllm_flags()
    ngram = json.loads(
        value_after(vllm_flags(speculative={"method": "ngram", "num_tokens": 5}), "--speculative-config")
    )
    assert ngram == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 3}
    draft = vllm_flags(speculative={"method": "draft", "draft_model": "/draft"})
    assert json.loads(value_after(draft, "--speculative-config"))["model"] == "/draft"


@pytest.mark.parametrize(
    ("build", "fields", "named"),
    [
        (llama_flags, {"kv_cache_dtype": "fp8"}, "serve.kv_cache_dtype"),
        (vllm_flags, {"kv_cache_dtype": "q8_0"}, "serve.kv_cache_dtype"),
        (llama_flags, {"speculative": {"method": "draft"}}, "serve.speculative.draft_model"),
        (vllm_flags, {"speculative": {"method": "draft"}}, "serve.speculative.draft_model"),
    ],
)
def test_combinations_an_engine_cannot_run_name_the_field(build: Any, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(TuneloopError, match=named.replace(".", r"\.")):
        build(**fields)


def test_vllm_on_this_cpu_refuses_kv_caches_its_cpu_attention_lacks() -> None:
    with pytest.raises(TuneloopError, match=r"serve\.kv_cache_dtype f16: vLLM on CPU"):
        vllm_flags(for_this_machine=True, kv_cache_dtype="f16")
    if cpu_runs_fp8_kv_cache():  # AVX-512 or AMX: vLLM-CPU stores fp8 (measured here on an AMX Xeon)
        assert value_after(vllm_flags(for_this_machine=True, kv_cache_dtype="fp8"), "--kv-cache-dtype") == "fp8"
    else:
        with pytest.raises(TuneloopError, match="AVX-512 or AMX"):
            vllm_flags(for_this_machine=True, kv_cache_dtype="fp8")


def test_a_missing_draft_model_stops_the_engine_before_it_starts(tmp_path: Path) -> None:
    settings = ServeConfig(speculative={"method": "draft", "draft_model": str(tmp_path / "absent.gguf")})
    with pytest.raises(TuneloopError, match=r"serve\.speculative\.draft_model .*absent\.gguf does not exist"):
        LlamaCppEngine(settings, "m", tmp_path / "m.gguf", {}, LLAMA_SERVER, max_model_len=512, log_file=None)
    with pytest.raises(TuneloopError, match=r"serve\.speculative\.draft_model"):
        VllmEngine(
            settings, "m", tmp_path, {}, python=VLLM_PYTHON, max_model_len=512, log_file=None, zero_lora_dir=None
        )


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_vllm_dtype_is_serving_precision(precision: str, tmp_path: Path) -> None:
    settings = ServeConfig(precision=precision)
    expected = VLLM_DTYPES[serving_precision(settings).name]
    engine = VllmEngine(
        settings, "m", tmp_path, {}, python=VLLM_PYTHON, max_model_len=512, log_file=None, zero_lora_dir=None
    )
    assert value_after(engine.command(8000), "--dtype") == expected
    assert value_after(vllm_flags(for_this_machine=True, precision=precision), "--dtype") == expected
    # A deploy artifact runs elsewhere: `auto` stays vLLM's own there.
    assert value_after(vllm_flags(precision=precision), "--dtype") == ("auto" if precision == "auto" else expected)


@pytest.mark.slow
def test_vllm_own_parser_reads_the_optimisation_flags_back(smollm2_folder: Path) -> None:
    """vLLM's own argument parser and engine config (no engine started): the flags mean what tuneloop meant."""
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM is missing: run `make vllm`")
    settings = ServeConfig(
        precision="fp32",
        prefix_caching=False,
        speculative={"method": "ngram", "num_tokens": 5, "ngram_size": 2},
        max_num_seqs=24,
        kv_cache_dtype="fp8" if cpu_runs_fp8_kv_cache() else "auto",
    )
    flags = vllm_arguments(settings, "m", str(smollm2_folder), {}, 8, 512, None)
    environment = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    probe = subprocess.run(
        [str(VLLM_PYTHON), str(PROBE), *flags], capture_output=True, text=True, env=environment, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    engine = json.loads(probe.stdout.strip().splitlines()[-1])
    assert engine["dtype"] == "torch.float32" and engine["prefix_caching"] is False and engine["max_num_seqs"] == 24
    assert engine["kv_cache_dtype"] == settings.kv_cache_dtype
    assert engine["speculative"] == {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "prompt_lookup_max": 2,
        "prompt_lookup_min": 2,
    }
    default = subprocess.run(
        [str(VLLM_PYTHON), str(PROBE), *vllm_arguments(ServeConfig(), "m", str(smollm2_folder), {}, 8, 512, None)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert default.returncode == 0, default.stderr[-3000:]
    assert json.loads(default.stdout.strip().splitlines()[-1])["prefix_caching"] is True


class GreedyReference:
    """The base model in fp32 with Transformers: is each token of an answer its greedy choice, within `tolerance`
    nats (another engine's precision or batch shapes may break near-ties the other way)?"""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def check(self, prompt: str, answer: str, tolerance: float) -> None:
        import torch

        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt_ids + answer_ids])).logits[0]
        logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        for step, token in enumerate(answer_ids):
            gap = float(logprobs[step].max() - logprobs[step, token])
            assert gap <= tolerance, (
                f"token {step} ({self.tokenizer.decode([token])!r}) {gap:.2f} nats off in {answer!r}"
            )


# The copy prompt has long repeats for n-gram drafts; the extraction prompts are the demo task's.
PROMPTS = [
    "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog.",
    *default_prompts(5),
]


def _answers(url: str, model: str) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    return answers


def _serve_llamacpp(tmp_path: Path, folder: Path, serve: str) -> tuple[list[str], dict[str, Any], str]:
    """Answers to PROMPTS from `tuneloop serve` with llama.cpp and the `serve` fields given, what llama-server
    itself says of its model and slots (/props, /slots), and what it logged."""
    workspace = tmp_path / "ws"  # one workspace: the GGUF conversions are cached across the servers
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {{base: {folder}}}\n"
        f"serve: {{engine: llamacpp, llamacpp_server: {LLAMA_SERVER}, llamacpp_parallel: 2, max_model_len: 512"
        f"{', ' + serve if serve else ''}}}\n"
    )
    log = workspace / "serve" / "llamacpp.log"
    start = log.stat().st_size if log.exists() else 0
    process, url = start_serve(config, workspace)
    try:
        wait_ready(url, process, seconds=300, log=log)
        answers = _answers(url, str(folder))
        direct = httpx.get(f"{url}/health", timeout=5).json()["replicas"][0]["url"].removesuffix("/v1")
        server = {
            "props": httpx.get(f"{direct}/props", timeout=5).json(),
            "slots": httpx.get(f"{direct}/slots", timeout=5).json(),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    return answers, server, log.read_text(errors="replace")[start:]


@pytest.mark.slow
def test_llama_server_runs_the_optimisations_through_tuneloop_serve(smollm2_folder: Path, tmp_path: Path) -> None:
    if not LLAMA_SERVER.exists():
        pytest.skip("llama-server is missing: run `make llamacpp`")
    default, server, _ = _serve_llamacpp(tmp_path, smollm2_folder, "")
    assert server["props"]["model_ftype"] == "Q8_0" and not server["slots"][0]["speculative"]
    # Speculative decoding verifies every drafted token with the served model, so greedy answers stay the same (and
    # prefix caching does not change requests sent one at a time): they must equal the default configuration's.
    speculative, server, log = _serve_llamacpp(
        tmp_path, smollm2_folder, "speculative: {method: ngram, num_tokens: 4, ngram_size: 3}, prefix_caching: false"
    )
    assert server["slots"][0]["speculative"] and "draft acceptance" in log  # it drafted and verified tokens
    # Verifying drafts in one batch of tokens sums in another order than decoding one token at a time, so a near-tie
    # may break the other way (measured here: `"quantity": 8` vs `"Eight X`). Every token of every answer
    # must still be the greedy choice of the fp32 model within a small margin; an unverified draft is off by nats.
    assert sum(a == b for a, b in zip(speculative, default, strict=True)) >= len(PROMPTS) // 2
    reference = GreedyReference(smollm2_folder)
    for prompt, answer in zip(PROMPTS, speculative, strict=True):
        reference.check(prompt, answer, tolerance=0.3)
    # All of them on q4_k_m weights with a q8_0 KV cache: lossy, so checked for right answers instead of equal ones
    # (q4_k_m also flips near-ties between batched and one-by-one verification: measured on 2 of 8 prompts).
    combined, server, log = _serve_llamacpp(
        tmp_path,
        smollm2_folder,
        "llamacpp_quant: q4_k_m, kv_cache_dtype: q8_0, prefix_caching: false, "
        "speculative: {method: ngram, num_tokens: 4, ngram_size: 3}",
    )
    assert server["props"]["model_ftype"] == "Q4_K - Medium" and server["slots"][0]["speculative"]
    assert "draft acceptance" in log
    assert "quick brown fox jumps over the lazy dog" in combined[0].lower()
    for answer in combined[1:]:  # the extraction task's format: a JSON object with its keys
        assert answer.lstrip().startswith("{") and '"name"' in answer and '"city"' in answer, answer
