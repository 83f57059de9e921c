"""The llama.cpp engine for real: llama-server built by `make llamacpp` (which `make test` runs), SmolLM2-135M
converted to GGUF with a LoRA GGUF switched per request, behind the gateway on 127.0.0.1, driven with the openai
client."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve.parity import PeftReference
from tests.serve.servers import start_serve, wait_ready
from tests.tiny_model import save_random_lora

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_llamacpp_engine_switches_lora_per_request(smollm2_folder: Path, tmp_path: Path) -> None:
    if not LLAMA_SERVER.exists():
        pytest.skip("llama-server is missing: run `make llamacpp`")
    from openai import OpenAI

    adapter = save_random_lora(smollm2_folder, tmp_path / "adapter", r=8, alpha=32, seed=0)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {{base: {smollm2_folder}}}\n"
        f"serve: {{engine: llamacpp, llamacpp_server: {LLAMA_SERVER}, llamacpp_quant: f16, llamacpp_parallel: 4}}\n"
    )
    process, url = start_serve(config, tmp_path / "ws", "--model", str(adapter))
    try:
        wait_ready(url, process, seconds=300, log=tmp_path / "ws" / "serve" / "llamacpp.log")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        models = {model.id: model for model in client.models.list().data}
        assert models[str(adapter)].model_extra["parent"] == str(smollm2_folder)

        def ask(model: str) -> str:
            answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
            assert answer.usage.completion_tokens > 0
            return answer.choices[0].message.content

        base_alone, adapter_alone = ask(str(smollm2_folder)), ask(str(adapter))
        assert "Paris" in base_alone and adapter_alone != base_alone
        # Base and adapter requests in flight together: each still gets its own weights. Every answer is checked
        # against PEFT token by token (batch shapes may flip near-ties; a wrong adapter is off by whole nats).
        with ThreadPoolExecutor(8) as pool:
            mixed = list(pool.map(ask, [str(smollm2_folder), str(adapter)] * 4))
        reference = PeftReference(smollm2_folder, adapter)
        for index, answer in enumerate([base_alone, adapter_alone, *mixed]):
            reference.check(QUESTION, answer, tolerance=0.15, adapter=index % 2 == 1)
        with pytest.raises(AssertionError):  # the check tells the adapter's answer from the base's
            reference.check(QUESTION, adapter_alone, tolerance=0.15, adapter=False)

        streamed = list(
            client.chat.completions.create(
                model=str(adapter),
                messages=QUESTION,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == adapter_alone
        assert streamed[-1].usage.completion_tokens > 0
        assert httpx.get(f"{url}/health", timeout=5).json()["engine"] == "llamacpp"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
