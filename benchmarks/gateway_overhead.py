"""The gateway's cost against the best direct configuration of one engine (issue #16's bar: >= 0.97x direct tokens/s).

One engine server serving the base model only (no LoRA: the fastest vLLM configuration), started by `tuneloop serve`
with default settings (precision `auto`, resolved for this CPU, or `--precision`); then, alternated `--rounds` times
at `--users` streaming users, 64 new tokens per request:

- direct: the engine's own OpenAI server;
- gateway: the tuneloop gateway in front of it, as configured by default (pass-through streaming);
- parsed: a second gateway (`engine: remote` at the same server) with `serve.passthrough: false`, every chunk parsed
  and re-serialised: the path before pass-through.

The medians of the alternated runs are compared (2 cores are shared by the load generator, the gateways and the
engine, so single runs are noisy).

    .venv/bin/python benchmarks/gateway_overhead.py [--engine vllm|llamacpp] [--users 32] [--rounds 5]
                                                    [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"


@contextmanager
def gateway(root: Path, name: str, serve: dict[str, Any]) -> Iterator[str]:
    """`tuneloop serve` with `serve` settings, its output in ROOT/NAME.log; yields its URL, SIGTERMs it after."""
    import yaml

    from tuneloop.net import free_port, wait_until_ready

    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": {"base": BASE}, "serve": serve}))
    port = free_port()
    with (root / f"{name}.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneloop.cli", "serve", "-c", str(config), "--port", str(port)],
            env={**os.environ, "TUNELOOP_HOME": str(root / "ws")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        outcome = wait_until_ready(url, process, 900)
        if outcome != "ready":
            raise RuntimeError(f"{name} {outcome}: {(root / f'{name}.log').read_text(errors='replace')[-1500:]}")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("vllm", "llamacpp"), default="vllm")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import httpx

    from tuneloop.device import cpu_description
    from tuneloop.models import materialize, resolve_base
    from tuneloop.serve.bench import bench_serve, default_prompts
    from tuneloop.workspace import Workspace

    print(f"CPU: {cpu_description()}", file=sys.stderr)
    prompts = default_prompts(128)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as servers:
        root = Path(scratch)
        materialize(resolve_base(BASE, Workspace(root / "ws")))
        engine_settings = {
            "engine": args.engine,
            "precision": args.precision,
            "vllm_python": str(REPO / ".venv-vllm" / "bin" / "python"),
            "llamacpp_server": str(REPO / ".llamacpp" / "bin" / "llama-server"),
        }
        main_url = servers.enter_context(gateway(root, "gateway", engine_settings))
        direct = httpx.get(f"{main_url}/health", timeout=10).json()["replicas"][0]["url"]
        parsed_url = servers.enter_context(
            gateway(root, "parsed", {"engine": "remote", "remote_urls": [direct], "passthrough": False})
        )
        engine_model = httpx.get(f"{direct}/models", timeout=10).json()["data"][0]["id"]
        targets = {"direct": (direct, engine_model), "gateway": (main_url, BASE), "parsed": (parsed_url, BASE)}
        bench_serve(direct, engine_model, prompts, users=args.users, requests=args.users, max_tokens=args.max_tokens)
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in targets}
        for round_number in range(args.rounds):
            for path, (url, model) in targets.items():
                result = bench_serve(
                    url, model, prompts, users=args.users, requests=2 * args.users, max_tokens=args.max_tokens
                )
                runs[path].append(result)
                print(
                    f"round {round_number + 1} {path}: {result['output_tokens_per_second']:.1f} tok/s, "
                    f"TTFT p50 {result['ttft_p50_s']:.3f} s, errors {result['errors']}",
                    file=sys.stderr,
                )
    medians = {
        path: statistics.median(r["output_tokens_per_second"] for r in results) for path, results in runs.items()
    }
    ttft = {path: statistics.median(r["ttft_p50_s"] for r in results) for path, results in runs.items()}
    errors = {path: sum(r["errors"] for r in results) for path, results in runs.items()}
    summary = {
        "cpu": cpu_description(),
        "engine": args.engine,
        "precision": args.precision,
        "users": args.users,
        "rounds": args.rounds,
        "median_tokens_per_second": medians,
        "median_ttft_p50_s": ttft,
        "errors": errors,
        "gateway_vs_direct": medians["gateway"] / medians["direct"],
        "parsed_vs_direct": medians["parsed"] / medians["direct"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
