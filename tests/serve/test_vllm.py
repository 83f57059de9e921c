"""The vLLM engine for real: vLLM's CPU build from .venv-vllm (`make vllm`, which `make test` runs), SmolLM2-135M
with a LoRA adapter, behind the gateway on 127.0.0.1, driven with the openai client."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve.parity import PeftReference
from tests.serve.servers import start_serve, wait_ready
from tests.tiny_model import save_random_lora
from tuneloop.serve.engines.vllm import default_vllm_python

REPO = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_vllm_engine_serves_base_and_adapter(smollm2_folder: Path, tmp_path: Path) -> None:
    vllm_python = REPO / default_vllm_python()
    if not vllm_python.exists():
        pytest.skip("vLLM's virtualenv is missing: run `make vllm`")
    from openai import OpenAI

    adapter = save_random_lora(smollm2_folder, tmp_path / "adapter", r=8, alpha=32, seed=0)
    other = save_random_lora(smollm2_folder, tmp_path / "other", r=4, alpha=16, seed=2)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {{base: {smollm2_folder}}}\nserve: {{engine: vllm, vllm_python: {vllm_python}, precision: fp32}}\n"
    )
    process, url = start_serve(config, tmp_path / "ws", "--model", str(adapter), "--model", str(other))
    try:
        wait_ready(url, process, seconds=600, log=tmp_path / "ws" / "serve" / "vllm.log")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        models = {model.id: model for model in client.models.list().data}
        assert str(adapter) in models and models[str(adapter)].model_extra["parent"] == str(smollm2_folder)
        answer = client.chat.completions.create(
            model=str(smollm2_folder),
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content and answer.usage.completion_tokens > 0

        def ask(model: str) -> str:
            reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        # Two adapters and the base in flight together (vLLM batches them with punica LoRA kernels): every answer
        # agrees with fp32 PEFT token by token, up to near-ties (measured: a 0.3-nat ',' vs '.' flip in the base
        # answer; a wrong adapter is off by whole nats, which the last check shows).
        with ThreadPoolExecutor(6) as pool:
            mixed = list(pool.map(ask, [str(smollm2_folder), str(adapter), str(other)] * 2))
        assert mixed[1] != mixed[0] and mixed[2] != mixed[0]
        for path, answers in ((adapter, mixed[1::3]), (other, mixed[2::3])):
            reference = PeftReference(smollm2_folder, path)
            for reply in answers:
                reference.check(QUESTION, reply, tolerance=0.5)
            reference.check(QUESTION, mixed[0], tolerance=0.5, adapter=False)
            with pytest.raises(AssertionError):
                reference.check(QUESTION, answers[0], tolerance=0.5, adapter=False)
        streamed = client.chat.completions.create(
            model=str(adapter),
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(streamed)
        assert chunks[-1].usage.completion_tokens > 0
        # The base streams through vLLM's all-zero LoRA (see zero_lora): the pass-through stream still names the
        # base, and says what the non-streamed answer said.
        base_stream = list(
            client.chat.completions.create(
                model=str(smollm2_folder), messages=QUESTION, max_tokens=12, temperature=0, stream=True
            )
        )
        assert {chunk.model for chunk in base_stream} == {str(smollm2_folder)}
        text = "".join(chunk.choices[0].delta.content or "" for chunk in base_stream if chunk.choices)
        assert text == answer.choices[0].message.content
        # serve.engine_metrics (default): vLLM's own series on the gateway's /metrics, counting these requests.
        exposition = httpx.get(f"{url}/metrics", timeout=30).text
        names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total")
        for name in names:
            assert f"\nvllm:{name}{{" in exposition, name
        prompt_tokens = [line for line in exposition.splitlines() if line.startswith("vllm:prompt_tokens_total{")]
        assert prompt_tokens and float(prompt_tokens[0].rsplit(" ", 1)[1]) > 0
        assert httpx.get(f"{url}/health", timeout=5).json()["engine"] == "vllm"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
