"""The evaluation engine for real: llama-server (built by `make llamacpp`, which `make test` runs) started without the
gateway for SmolLM2-135M in f32 with a LoRA GGUF, one endpoint per evaluated model, answers compared with the
in-process fp32 `generate` evaluation uses otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import save_random_lora
from tuneloop.chat_client import chat_generate
from tuneloop.config import LoopConfig
from tuneloop.config_file import validate_config
from tuneloop.errors import TuneloopError
from tuneloop.registry.refs import ModelSpec, resolve_model_ref
from tuneloop.serve.offline import available_eval_engine, engine_endpoints
from tuneloop.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
QUESTIONS = [
    "What is the capital of France?",
    "Is the sentiment of this sentence positive or negative? 'a gorgeous, witty film'",
    "Name a primary color.",
    "What is 2 + 2?",
    "Translate 'good morning' into French.",
    "Give one word that rhymes with 'cat'.",
]


def _config(base: Path, **sections: dict[str, object]) -> LoopConfig:
    return validate_config({"model": {"base": str(base)}, **sections})


def test_available_eval_engine_follows_the_setting_and_what_is_installed(tmp_path: Path, tiny_model_dir: Path) -> None:
    missing = {"llamacpp_server": str(tmp_path / "no-llama-server"), "vllm_python": str(tmp_path / "no-python")}
    assert available_eval_engine(_config(tiny_model_dir, eval={"engine": "inprocess"})) is None
    assert available_eval_engine(_config(tiny_model_dir, eval={"engine": "vllm"}, serve=missing)) == "vllm"
    assert available_eval_engine(_config(tiny_model_dir, serve=missing)) is None  # auto, nothing installed
    server = tmp_path / "llama-server"
    server.write_text("")
    installed = _config(tiny_model_dir, serve={**missing, "llamacpp_server": str(server)})
    assert available_eval_engine(installed) == "llamacpp"
    full = ModelSpec("full", "tuned", tiny_model_dir, full_model=tiny_model_dir)
    assert available_eval_engine(installed, [full]) is None  # engines serve adapters on one base


def test_missing_engine_says_what_to_install(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, serve={"llamacpp_server": str(tmp_path / "no-llama-server")})
    base = ModelSpec("base", "base", tiny_model_dir)
    with pytest.raises(TuneloopError) as error, engine_endpoints([base], config, Workspace(tmp_path), "llamacpp"):
        pass
    assert "make llamacpp" in str(error.value.hint)
    full = ModelSpec("full", "tuned", tiny_model_dir, full_model=tiny_model_dir)
    with pytest.raises(TuneloopError, match="full fine-tune"), engine_endpoints([full], config, Workspace(tmp_path)):
        pass


@pytest.mark.slow
def test_llamacpp_endpoints_answer_for_base_and_adapter_like_in_process(smollm2_folder: Path, tmp_path: Path) -> None:
    if not LLAMA_SERVER.exists():
        pytest.fail("llama-server is missing: run `make llamacpp` (it builds .llamacpp/bin/llama-server)")
    import torch

    from tuneloop.evaluate.generate import generate, load_for_eval
    from tuneloop.evaluate.parity import parity

    adapter = save_random_lora(smollm2_folder, tmp_path / "adapter", r=8, alpha=32, seed=0)
    config = _config(
        smollm2_folder,
        eval={"precision": "fp32"},
        serve={"llamacpp_server": str(LLAMA_SERVER), "llamacpp_parallel": 4, "max_model_len": 512},
    )
    workspace = Workspace(tmp_path / "ws")
    specs = [
        resolve_model_ref("base", config, workspace),
        resolve_model_ref(str(adapter), config, workspace, label="tuned"),
    ]
    prompts = [[{"role": "user", "content": question}] for question in QUESTIONS]
    with engine_endpoints(specs, config, workspace, "llamacpp") as endpoints:
        assert set(endpoints) == {"base", "tuned"}
        assert endpoints["base"].base_url == endpoints["tuned"].base_url  # one server for both
        assert endpoints["tuned"].extra_body == {"lora": [{"id": 0, "scale": 1.0}]}
        engine = {
            label: [answer.text for answer in chat_generate(endpoint, prompts, 24, concurrency=4)]
            for label, endpoint in endpoints.items()
        }
        url = endpoints["base"].base_url
    import httpx

    with pytest.raises(httpx.HTTPError):  # stopped on exit
        httpx.get(url.removesuffix("/v1") + "/health", timeout=2)
    assert all(engine["base"]) and all(engine["tuned"])
    assert "Paris" in engine["base"][0]
    assert sum(b != t for b, t in zip(engine["base"], engine["tuned"], strict=True)) >= len(QUESTIONS) // 2

    equal = 0
    for spec in specs:  # the in-process path at the same precision
        model, tokenizer = load_for_eval(spec, torch.float32)
        in_process = [g.text for g in generate(model, tokenizer, prompts, 24, batch_size=len(prompts))]
        report = parity(in_process, engine[spec.label])
        print(spec.label, report)  # the reported share, for the record (-s)
        assert report["rows"] == len(QUESTIONS)
        assert len(report["differences"]) == min(report["rows"] - report["equal"], 5)
        assert all(d["reference"] != d["engine"] for d in report["differences"])
        equal += report["equal"]
    # Near-ties may flip between llama.cpp's and torch's fp32 kernels (and the LoRA GGUF is f16): measured 6/6 base,
    # 4-5/6 for this strong random adapter; most answers must be the same.
    assert equal / (2 * len(QUESTIONS)) > 0.5


@pytest.mark.slow
def test_tuneloop_eval_generates_through_the_engine_and_reports_parity(smollm2_folder: Path, tmp_path: Path) -> None:
    """`tuneloop eval` with eval.engine: llamacpp: the answers come from one llama-server (started and stopped by the
    command), the auto budget and newline stop apply, and a sample is answered in-process for the parity report."""
    import json

    import yaml
    from typer.testing import CliRunner

    from tuneloop.cli import app

    if not LLAMA_SERVER.exists():
        pytest.fail("llama-server is missing: run `make llamacpp` (it builds .llamacpp/bin/llama-server)")
    adapter = save_random_lora(smollm2_folder, tmp_path / "adapter", r=8, alpha=32, seed=0)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": q, "completion": "four"}) + "\n" for q in QUESTIONS))
    config = tmp_path / "loop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(smollm2_folder)},
                "data": {"sources": [{"path": str(rows)}]},
                "eval": {
                    "engine": "llamacpp",
                    "precision": "fp32",
                    "metrics": ["exact_match", "generation_stats"],
                    "parity_rows": 3,
                },
                "serve": {"llamacpp_server": str(LLAMA_SERVER), "llamacpp_parallel": 4, "max_model_len": 512},
            }
        )
    )
    result = CliRunner().invoke(
        app,
        ["eval", "-c", str(config), "--model", str(adapter), "--data", str(rows), "--json"],
        env={"TUNELOOP_HOME": str(tmp_path / "ws")},
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    details = json.loads((Path(summary["dir"]) / "metrics.json").read_text())["details"]
    for label in ("adapter", "base"):
        assert details[label]["endpoint"].startswith("smollm2") or "127.0.0.1" in details[label]["endpoint"]
        assert details[label]["parity"]["rows"] == 3 and 0 <= details[label]["parity"]["equal"] <= 3
        # one-word references: budget = 1.5 x 1 token + 16, and no answer runs past it
        assert summary["metrics"][label]["p95_output_tokens"] <= 18
    outputs = [json.loads(line) for line in (Path(summary["dir"]) / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == len(QUESTIONS) and all("\n" not in row["outputs"]["base"] for row in outputs)


def test_auto_falls_back_to_in_process_when_the_engine_cannot_serve_the_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The tiny test model's tokenizer is one llama.cpp's GGUF converter does not know: `auto` generates in-process
    (and says why), while naming the engine is an error."""
    import io

    from rich.console import Console

    from tuneloop.serve.offline import local_eval_engine

    if not LLAMA_SERVER.exists():
        pytest.fail("llama-server is missing: run `make llamacpp` (it builds .llamacpp/bin/llama-server)")
    adapter = save_random_lora(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8, seed=0)
    workspace = Workspace(tmp_path / "ws")
    serve = {"llamacpp_server": str(LLAMA_SERVER)}
    auto = _config(tiny_model_dir, serve=serve)
    specs = [resolve_model_ref(str(adapter), auto, workspace, label="tuned")]
    printed = io.StringIO()
    with local_eval_engine(auto, workspace, Console(file=printed, width=200))(specs) as endpoints:
        assert endpoints == {}
    assert "generating in-process" in printed.getvalue()
    named = _config(tiny_model_dir, serve=serve, eval={"engine": "llamacpp"})
    with pytest.raises(TuneloopError), local_eval_engine(named, workspace)(specs):
        pass
