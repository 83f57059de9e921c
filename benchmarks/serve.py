"""Serving with SmolLM2-135M on this machine: gateway overhead, each inference optimisation on vs off, load up to 100
users, batch inference. Every row names its engine, setting and users and is compared with its baseline measured in
the same run; rows are kept when the optimisation loses.

Parts (`--only`, several allowed; default all):

- overhead: each server engine (vLLM, llama.cpp) directly vs through the tuneloop gateway, at 8 and 32 users, for
  the base model and a LoRA adapter (random, small nonzero weights: speed does not depend on what it learned); the
  two paths alternate `--repeats` times (default 3) and the median run of each is kept.
- optimisations: prefix caching (a shared ~1000-token system prompt), KV-cache type (llama.cpp q8_0 vs f16; vLLM
  fp8 where its CPU attention has AVX-512/AMX), speculative decoding (n-gram; no draft model exists for
  SmolLM2-135M, the family's smallest), continuous-batching limits (vLLM max_num_seqs 8/32/128, llama.cpp slots
  8/16/32), llama.cpp weights (f16 vs q8_0 vs q4_k_m); AWQ/GPTQ rows say they need a GPU.
- users: streamed requests through the gateway at 1, 8, 32, 64 and 100 users (errors column).
- batch: requests/s of the gateway's synchronous /v1/batch (16 requests per call, 4 calls in flight) and of the
  Files + Batches API, next to the brief's > 10 req/s.

    .venv/bin/python benchmarks/serve.py [--only overhead optimisations users batch] [--engines vllm llamacpp]
                                         [--max-tokens 64] [--repeats 3] [--quick] [--json]

`--quick` is a smoke test (few requests, small users counts, one repeat). Servers are started one at a time, each
setting once, and stopped before the next (the 2 cores are shared by the load generator, the gateway and the engine).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
PARTS = ("overhead", "optimisations", "users", "batch")
TARGET_REQUESTS_PER_SECOND = 10  # the brief's batch-inference target


@dataclass
class Plan:
    """How much to measure: the full run, or `--quick`'s smoke test."""

    max_tokens: int
    repeats: int
    quick: bool
    overhead_users: tuple[int, ...] = (8, 32)
    users_ladder: tuple[int, ...] = (1, 8, 32, 64, 100)
    optimisation_users: int = 8
    batching_users: int = 32
    system_prompt_tokens: int = 1000
    batch_requests: int = 256

    @classmethod
    def make(cls, max_tokens: int, repeats: int | None, quick: bool) -> Plan:
        if not quick:
            return cls(max_tokens, repeats or 3, quick)
        return cls(
            max_tokens=min(max_tokens, 8),
            repeats=repeats or 1,
            quick=True,
            overhead_users=(2,),
            users_ladder=(1, 4),
            optimisation_users=2,
            batching_users=4,
            system_prompt_tokens=200,
            batch_requests=16,
        )

    def requests(self, users: int) -> int:
        """Requests per streamed run: two per user, at least 32 (the issue's 32-user runs sent 64), 4 when quick."""
        return max(users, 4) if self.quick else max(2 * users, 32)


@dataclass
class Row:
    part: str
    engine: str
    knob: str
    setting: str
    users: int | None
    result: dict[str, Any] | None = None  # None: not run (see note)
    baseline: str | None = None  # the setting of the row this one is compared with (same part, engine, knob, users)
    note: str = ""
    ratio: float | None = None  # tokens/s (batch rows: requests/s) relative to the baseline row
    ttft_ratio: float | None = None  # TTFT p50 relative to the baseline row (below 1: faster first token)

    def throughput(self) -> float | None:
        if self.result is None:
            return None
        key = "requests_per_second" if self.result["mode"] != "stream" else "output_tokens_per_second"
        return float(self.result[key])

    def as_dict(self) -> dict[str, Any]:
        result = self.result or {}
        return {
            "part": self.part,
            "engine": self.engine,
            "knob": self.knob,
            "setting": self.setting,
            "users": self.users,
            "output_tokens_per_second": result.get("output_tokens_per_second"),
            "requests_per_second": result.get("requests_per_second"),
            "ttft_p50_s": result.get("ttft_p50_s"),
            "ttft_p95_s": result.get("ttft_p95_s"),
            "errors": result.get("errors"),
            "baseline": self.baseline,
            "ratio": self.ratio,
            "ttft_ratio": self.ttft_ratio,
            "note": self.note,
            "result": self.result,
        }


@dataclass
class Gateway:
    url: str
    direct_url: str | None  # the engine's own server (vLLM, llama-server), None for the in-process engine
    # Per served name, the request fields the gateway adds for that engine (llama.cpp's `lora`, vLLM's zero LoRA):
    # a direct request carries them too, so both paths ask the engine for the same work.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


class Bench:
    """Starts gateways on one workspace (SmolLM2 and its GGUFs converted once) and measures through them."""

    def __init__(self, root: Path, plan: Plan, adapter: Path | None) -> None:
        from tuneloop.serve.bench import default_prompts, shared_system_prompt

        self.root = root
        self.workspace = root / "ws"
        self.plan = plan
        self.adapter = adapter
        self.prompts = default_prompts(128)
        self.system_prompt = shared_system_prompt(plan.system_prompt_tokens)
        self.starts = 0

    @contextmanager
    def gateway(self, engine: str, serve: dict[str, Any], with_adapter: bool = False) -> Iterator[Gateway]:
        import httpx
        import yaml

        from tuneloop.net import free_port, wait_until_ready

        self.starts += 1
        config = self.root / f"serve-{self.starts}.yaml"
        settings = {"engine": engine, "vllm_python": str(VLLM_PYTHON), "llamacpp_server": str(LLAMA_SERVER), **serve}
        config.write_text(yaml.safe_dump({"model": {"base": BASE}, "serve": settings}))
        port = free_port()
        log = self.root / f"gateway-{self.starts}-{engine}.log"
        extra = ["--model", str(self.adapter)] if with_adapter and self.adapter else []
        with log.open("w") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneloop.cli", "serve", "-c", str(config), "--port", str(port), *extra],
                env={**os.environ, "TUNELOOP_HOME": str(self.workspace)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            outcome = wait_until_ready(url, process, 900)
            if outcome != "ready":
                tail = log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{engine} gateway with {serve} {outcome}:\n{tail}")
            print(f"  {engine} {serve or 'defaults'} ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            replicas = httpx.get(f"{url}/health", timeout=10).json().get("replicas") or []
            direct = replicas[0]["url"] if replicas else None
            self._warm_up(url)
            yield Gateway(url, direct, self._overrides(engine, with_adapter))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _warm_up(self, url: str) -> None:
        """A few unmeasured requests first: a fresh server's first batches pay one-off costs (vLLM compiles its
        graphs, llama-server allocates its buffers), which would count against whichever setting runs first."""
        from tuneloop.serve.bench import bench_serve

        bench_serve(url, BASE, self.prompts, users=4, requests=8, max_tokens=8)

    def _overrides(self, engine: str, with_adapter: bool) -> dict[str, dict[str, Any]]:
        if not (with_adapter and self.adapter):
            return {}
        if engine == "llamacpp":
            from tuneloop.serve.engines.llamacpp import lora_request_fields

            return lora_request_fields(BASE, [str(self.adapter)])
        if engine == "vllm":
            from tuneloop.device import has_gpu
            from tuneloop.serve.engines.vllm import ZERO_LORA_NAME

            return {} if has_gpu() else {BASE: {"model": ZERO_LORA_NAME}}
        return {}

    def stream(
        self,
        url: str,
        users: int,
        model: str = BASE,
        shared_prefix: bool = False,
        extra_body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from tuneloop.serve.bench import bench_serve

        result = bench_serve(
            url,
            model,
            self.prompts,
            users=users,
            requests=self.plan.requests(users),
            max_tokens=self.plan.max_tokens,
            system_prompt=self.system_prompt if shared_prefix else None,
            extra_body=extra_body,
        )
        print(
            f"    {users} users{' shared prefix' if shared_prefix else ''}: "
            f"{result['output_tokens_per_second']:.1f} tok/s, TTFT p50 {result['ttft_p50_s']}, "
            f"errors {result['errors']}",
            file=sys.stderr,
        )
        return result


# -- overhead: gateway vs direct ----------------------------------------------------------------------------------


def overhead(bench: Bench, engine: str) -> list[Row]:
    """Direct vs gateway, alternated `repeats` times per users value and model; the median run of each is kept."""
    rows: list[Row] = []
    models = [("base", BASE)] + ([("adapter", str(bench.adapter))] if bench.adapter else [])
    with bench.gateway(engine, {}, with_adapter=True) as gateway:
        assert gateway.direct_url is not None, engine
        for users in bench.plan.overhead_users:
            for label, model in models:
                runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
                for _ in range(bench.plan.repeats):
                    overrides = gateway.overrides.get(model, {})
                    runs["direct"].append(bench.stream(gateway.direct_url, users, model, extra_body=overrides))
                    runs["gateway"].append(bench.stream(gateway.url, users, model))
                for path in ("direct", "gateway"):
                    rows.append(
                        Row(
                            "overhead",
                            engine,
                            f"gateway vs direct ({label})",
                            path,
                            users,
                            _median_run(runs[path]),
                            baseline=None if path == "direct" else "direct",
                            note=f"median of {bench.plan.repeats} alternated runs",
                        )
                    )
    return rows


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["output_tokens_per_second"])
    return ordered[(len(ordered) - 1) // 2]


# -- optimisations: each knob on vs off --------------------------------------------------------------------------


@dataclass
class Setting:
    """One knob's value on one engine: the serve fields that set it and the workloads it is measured on."""

    knob: str
    label: str
    serve: dict[str, Any]
    users: tuple[int, ...]
    baseline: str | None = None  # None: this is the baseline (off / default)
    shared_prefix: bool = False
    skip: str = ""  # why it is not run here (a row is still written)


def optimisation_settings(engine: str, plan: Plan) -> list[Setting]:
    from tuneloop.device import has_gpu
    from tuneloop.serve.engines.optimisations import cpu_runs_fp8_kv_cache

    users = (plan.optimisation_users,)
    speculative = {"method": "ngram", "num_tokens": 4, "ngram_size": 3}
    spec_users = (1, plan.optimisation_users)
    prefix = [
        Setting("prefix caching", "off", {"prefix_caching": False}, users, shared_prefix=True),
        Setting("prefix caching", "on (default)", {}, users, baseline="off", shared_prefix=True),
    ]
    if engine == "llamacpp":
        slots = (plan.batching_users,)
        return [
            *prefix,
            Setting("KV cache", "f16 (default)", {}, users),
            Setting(
                "KV cache", "q8_0 (+ flash attention)", {"kv_cache_dtype": "q8_0"}, users, baseline="f16 (default)"
            ),
            Setting("speculative decoding", "off", {}, spec_users),
            Setting(
                "speculative decoding", "ngram (3-gram, 4 drafted)", {"speculative": speculative}, spec_users, "off"
            ),
            Setting(
                "speculative decoding",
                "draft model",
                {},
                users,
                "off",
                skip="no draft model: SmolLM2-135M is its family's smallest (the same vocabulary is needed)",
            ),
            Setting("slots (llamacpp_parallel)", "16 (default)", {}, slots),
            Setting("slots (llamacpp_parallel)", "8", {"llamacpp_parallel": 8}, slots, "16 (default)"),
            Setting("slots (llamacpp_parallel)", "32", {"llamacpp_parallel": 32}, slots, "16 (default)"),
            Setting("weights", "f16", {"llamacpp_quant": "f16"}, users),
            Setting("weights", "q8_0 (default)", {}, users, "f16"),
            Setting("weights", "q4_k_m", {"llamacpp_quant": "q4_k_m"}, users, "f16"),
        ]
    fp8_skip = "" if has_gpu() or cpu_runs_fp8_kv_cache() else "GPU only here: vLLM-CPU needs AVX-512 or AMX for fp8"
    sequences = (plan.batching_users,)
    return [
        *prefix,
        Setting("KV cache", "auto (default)", {}, users),
        Setting("KV cache", "fp8", {"kv_cache_dtype": "fp8"}, users, "auto (default)", skip=fp8_skip),
        Setting("speculative decoding", "off", {}, spec_users),
        Setting("speculative decoding", "ngram (3-gram, 4 drafted)", {"speculative": speculative}, spec_users, "off"),
        Setting("max_num_seqs", "default", {}, sequences),
        *[Setting("max_num_seqs", str(n), {"max_num_seqs": n}, sequences, "default") for n in (8, 32, 128)],
        Setting(
            "weights",
            "AWQ / GPTQ",
            {},
            users,
            skip="GPU only: vLLM-CPU runs neither; measured on the GPU machine when one is lent",
        ),
    ]


def optimisations(bench: Bench, engine: str) -> list[Row]:
    """Every setting of every knob; a server per distinct set of serve fields, started once (defaults first)."""
    settings = optimisation_settings(engine, bench.plan)
    results: dict[tuple[str, str, int], dict[str, Any] | None] = {}
    notes: dict[tuple[str, str], str] = {}
    groups: dict[str, list[Setting]] = {}
    for setting in settings:
        if setting.skip:
            notes[(setting.knob, setting.label)] = setting.skip
        else:
            groups.setdefault(json.dumps(setting.serve, sort_keys=True), []).append(setting)
    for key, members in sorted(groups.items(), key=lambda item: item[0] != "{}"):
        try:
            with bench.gateway(engine, json.loads(key)) as gateway:
                for setting in members:
                    for users in setting.users:
                        results[(setting.knob, setting.label, users)] = bench.stream(
                            gateway.url, users, shared_prefix=setting.shared_prefix
                        )
        except RuntimeError as error:  # a setting this machine cannot run is a row too, with the reason
            print(f"  {engine} {key}: {error}", file=sys.stderr)
            for setting in members:
                notes[(setting.knob, setting.label)] = f"failed to start: {str(error).splitlines()[0]}"
    rows = []
    for setting in settings:
        for users in setting.users:
            workload = f"shared {bench.plan.system_prompt_tokens}-token system prompt" if setting.shared_prefix else ""
            note = notes.get((setting.knob, setting.label), workload)
            rows.append(
                Row(
                    "optimisations",
                    engine,
                    setting.knob,
                    setting.label,
                    users,
                    results.get((setting.knob, setting.label, users)),
                    baseline=setting.baseline,
                    note=note,
                )
            )
    return rows


# -- users and batch, through the gateway with default settings ---------------------------------------------------


def users_and_batch(bench: Bench, engine: str, parts: set[str]) -> list[Row]:
    from tuneloop.serve.bench import bench_batches_api, bench_sync_batch

    rows: list[Row] = []
    with bench.gateway(engine, {}) as gateway:
        if "users" in parts:
            for users in bench.plan.users_ladder:
                rows.append(
                    Row("users", engine, "through the gateway", "defaults", users, bench.stream(gateway.url, users))
                )
        if "batch" in parts:
            requests, per_call, in_flight = bench.plan.batch_requests, 16, 4
            synchronous = bench_sync_batch(
                gateway.url, BASE, bench.prompts, requests, per_call, in_flight, bench.plan.max_tokens
            )
            api = bench_batches_api(gateway.url, BASE, bench.prompts, requests, bench.plan.max_tokens)
            for knob, result, users in (
                (f"/v1/batch ({per_call} per call)", synchronous, in_flight),
                ("Files + Batches API", api, None),
            ):
                print(
                    f"    {knob}: {result['requests_per_second']:.2f} req/s, failed {result['failed']}", file=sys.stderr
                )
                rows.append(
                    Row(
                        "batch",
                        engine,
                        knob,
                        f"{requests} requests",
                        users,
                        result,
                        note=f"{result['completed']}/{requests} completed; target > {TARGET_REQUESTS_PER_SECOND} req/s",
                    )
                )
    return rows


# -- putting it together ------------------------------------------------------------------------------------------


def compare(rows: list[Row]) -> None:
    """Each row with a baseline gets its ratios against the row of that setting (same part, engine, knob, users)."""
    index = {(row.part, row.engine, row.knob, row.setting, row.users): row for row in rows}
    for row in rows:
        if row.baseline is None or row.result is None:
            continue
        base = index.get((row.part, row.engine, row.knob, row.baseline, row.users))
        if base is None or base.result is None:
            continue
        throughput, base_throughput = row.throughput(), base.throughput()
        if throughput is not None and base_throughput:
            row.ratio = throughput / base_throughput
        ttft, base_ttft = row.result.get("ttft_p50_s"), base.result.get("ttft_p50_s")
        if ttft is not None and base_ttft:
            row.ttft_ratio = ttft / base_ttft


def random_adapter(folder: Path, out: Path) -> Path:
    """A LoRA of SmolLM2 with small random weights (B scaled to 1%, so answers stay sensible), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def print_table(rows: list[Row], cpu: str, plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M serving, {plan.max_tokens} new tokens per request; {cpu}")
    for column in ("part", "engine", "knob", "setting", "users", "tok/s", "req/s", "TTFT p50", "TTFT p95", "errors"):
        table.add_column(column, justify="left" if column in ("part", "engine", "knob", "setting") else "right")
    table.add_column("x baseline", justify="right")
    table.add_column("TTFT x", justify="right")
    table.add_column("note")

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        result = row.result or {}
        table.add_row(
            row.part,
            row.engine,
            row.knob,
            row.setting,
            "-" if row.users is None else str(row.users),
            number(result.get("output_tokens_per_second")),
            number(result.get("requests_per_second"), 2),
            number(result.get("ttft_p50_s"), 3),
            number(result.get("ttft_p95_s"), 3),
            "-" if not result else str(result["errors"]),
            "-" if row.ratio is None else f"{row.ratio:.2f}x vs {row.baseline}",
            number(row.ttft_ratio, 2),
            row.note if row.result is not None else f"not run: {row.note}",
        )
    Console(width=240).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    parser.add_argument("--engines", nargs="+", choices=("vllm", "llamacpp"), default=["vllm", "llamacpp"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="overhead: alternated runs (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few requests and users, one repeat")
    parser.add_argument("--workspace", type=Path, help="reuse this folder (SmolLM2 and GGUFs converted once)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    parser.add_argument("--save", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args()

    from tuneloop.device import cpu_description
    from tuneloop.models import materialize, resolve_base
    from tuneloop.workspace import Workspace

    plan = Plan.make(args.max_tokens, args.repeats, args.quick)
    cpu = cpu_description()
    print(f"CPU: {cpu}", file=sys.stderr)
    installed = {"vllm": VLLM_PYTHON.exists(), "llamacpp": LLAMA_SERVER.exists()}
    engines = [engine for engine in args.engines if installed[engine]]
    for missing in sorted(set(args.engines) - set(engines)):
        print(f"{missing} is not installed (make {missing}): skipped", file=sys.stderr)
    parts = set(args.only)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workspace or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        folder = materialize(resolve_base(BASE, Workspace(root / "ws")))
        adapter = random_adapter(folder, root / "adapter") if "overhead" in parts else None
        bench = Bench(root, plan, adapter)
        steps: list[tuple[str, Callable[[], list[Row]]]] = []
        for engine in engines:
            if "overhead" in parts:
                steps.append((f"{engine} overhead", lambda engine=engine: overhead(bench, engine)))
            if "optimisations" in parts:
                steps.append((f"{engine} optimisations", lambda engine=engine: optimisations(bench, engine)))
            if parts & {"users", "batch"}:
                steps.append((f"{engine} users/batch", lambda engine=engine: users_and_batch(bench, engine, parts)))
        for name, step in steps:
            print(f"{name}:", file=sys.stderr)
            started = time.perf_counter()
            rows += step()
            print(f"  {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    compare(rows)
    report = {"cpu": cpu, "max_tokens": plan.max_tokens, "quick": plan.quick, "rows": [r.as_dict() for r in rows]}
    if args.save:
        args.save.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    print_table(rows, cpu, plan)
    summary = [row for row in rows if row.part == "overhead" and row.ratio is not None]
    for row in summary:
        print(f"{row.engine} {row.knob} at {row.users} users: gateway {row.ratio:.3f}x direct tokens/s")
    if plan.quick:
        print("(--quick: a smoke test, the numbers mean nothing)")


if __name__ == "__main__":
    main()
