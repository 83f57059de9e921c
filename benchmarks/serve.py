"""Serving throughput and latency with SmolLM2-135M on this machine, in one run:

- baseline: naive Transformers `generate`, one request at a time (fp32, as loaded by default);
- the tuneloop gateway with each available engine (in-process Transformers; vLLM when `make vllm` was run;
  llama.cpp when `make llamacpp` was run) at 1, 8 and 32 concurrent users: output tokens/s and TTFT p50/p95/p99;
- gateway overhead: each server engine (vLLM, llama-server) measured directly vs through the gateway at 8 users,
  alternating three times, medians compared.

    .venv/bin/python benchmarks/serve.py [--max-tokens 64] [--users 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def naive_baseline(folder: Path, prompts: list[str], max_tokens: int, requests: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens, ttfts, started = 0, [], time.perf_counter()
    for prompt in prompts[:requests]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            begin = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - begin)
            output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
        tokens += output.shape[1] - batch["input_ids"].shape[1]
    wall = time.perf_counter() - started - sum(ttfts)  # the extra 1-token calls measured TTFT only
    ttfts.sort()
    return {"output_tokens_per_second": tokens / wall, "ttft_p50_s": ttfts[len(ttfts) // 2], "requests": requests}


def start_gateway(config: Path, engine: str, workspace: Path) -> tuple[subprocess.Popen[bytes], str]:
    from tuneloop.net import free_port, wait_until_ready

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneloop.cli", "serve", "-c", str(config), "--engine", engine, "--port", str(port)],
        env={**os.environ, "TUNELOOP_HOME": str(workspace)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    outcome = wait_until_ready(url, process, 600)
    if outcome != "ready":
        raise RuntimeError(f"{engine} gateway {outcome} (exit status {process.poll()})")
    return process, url


def overhead(url: str, engine: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The engine's own server vs the gateway in front of it, 8 users, alternated three times (2 cores are shared by
    the load generator, the gateway and the engine, so single runs are noisy); the medians are kept."""
    import statistics

    import httpx

    from tuneloop.serve.bench import bench_serve

    direct_url = httpx.get(f"{url}/health", timeout=5).json()["replicas"][0]["url"]
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    for _ in range(3):
        for kind, target in (("direct", direct_url), ("gateway", url)):
            runs[kind].append(
                bench_serve(target, "smollm2-135m-instruct", prompts, users=8, requests=24, max_tokens=max_tokens)
            )
    out = {}
    for kind, results in runs.items():
        median = statistics.median(result["output_tokens_per_second"] for result in results)
        out[f"{engine}-{kind}@8-median"] = next(r for r in results if r["output_tokens_per_second"] == median)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tuneloop.models import materialize, resolve_base
    from tuneloop.serve.bench import bench_serve, default_prompts
    from tuneloop.workspace import Workspace

    prompts = default_prompts(128)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        folder = materialize(resolve_base("smollm2-135m-instruct", Workspace(workspace)))
        config = Path(tmp) / "serve.yaml"
        config.write_text(
            f"model: {{base: smollm2-135m-instruct}}\nserve: {{vllm_python: {REPO / '.venv-vllm/bin/python'}, "
            f"llamacpp_server: {REPO / '.llamacpp/bin/llama-server'}}}\n"
        )
        results["naive"] = naive_baseline(folder, prompts, args.max_tokens, requests=4)
        print(f"naive: {results['naive']}", file=sys.stderr)
        engines = ["transformers"]
        engines += ["vllm"] if (REPO / ".venv-vllm/bin/python").exists() else []
        engines += ["llamacpp"] if (REPO / ".llamacpp/bin/llama-server").exists() else []
        for engine in engines:
            process, url = start_gateway(config, engine, workspace)
            try:
                for users in args.users:
                    result = bench_serve(
                        url,
                        "smollm2-135m-instruct",
                        prompts,
                        users=users,
                        requests=max(2 * users, 8),
                        max_tokens=args.max_tokens,
                    )
                    results[f"{engine}@{users}"] = result
                    print(
                        f"{engine} @ {users} users: {result['output_tokens_per_second']:.1f} tok/s, "
                        f"ttft p50 {result['ttft_p50_s']}",
                        file=sys.stderr,
                    )
                if engine in ("vllm", "llamacpp"):
                    results.update(overhead(url, engine, prompts, args.max_tokens))
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    naive = results["naive"]["output_tokens_per_second"]
    table = Table(title=f"SmolLM2-135M serving on this CPU, {args.max_tokens} new tokens per request")
    for column in ("setup", "users", "output tok/s", "vs naive", "TTFT p50 s", "TTFT p95 s", "TTFT p99 s", "errors"):
        table.add_column(column)
    table.add_row(
        "naive generate, one at a time (fp32)",
        "1",
        f"{naive:.1f}",
        "1.0x",
        f"{results['naive']['ttft_p50_s']:.3f}",
        "-",
        "-",
        "0",
    )
    for key, result in results.items():
        if key == "naive" or "@" not in key:
            continue
        name, users = key.split("@")
        table.add_row(
            name,
            users.split("-")[0],
            f"{result['output_tokens_per_second']:.1f}",
            f"{result['output_tokens_per_second'] / naive:.1f}x",
            *[f"{result[f'ttft_p{p}_s']:.3f}" if result[f"ttft_p{p}_s"] is not None else "-" for p in (50, 95, 99)],
            str(result["errors"]),
        )
    Console(width=160).print(table)
    for engine in ("vllm", "llamacpp"):
        if f"{engine}-direct@8-median" in results:
            direct = results[f"{engine}-direct@8-median"]["output_tokens_per_second"]
            through = results[f"{engine}-gateway@8-median"]["output_tokens_per_second"]
            print(f"gateway overhead at 8 users ({engine}, median of 3): {(direct - through) / direct:+.1%} tokens/s")


if __name__ == "__main__":
    main()
