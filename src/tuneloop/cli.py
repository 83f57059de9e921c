"""The `tuneloop` command line. Thin by design: parse arguments, call one stage function, print a table or --json."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.errors import TuneloopError

app = typer.Typer(
    help="tuneloop: data -> training -> evaluation -> registry -> serving, in one tool.", no_args_is_help=True
)
config_app = typer.Typer(help="Validate and document the config file.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(help="Load tests and benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
registry_app = typer.Typer(help="Model registry: versions, aliases, lineage, model cards.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
ConfigOptionalOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="The loop's YAML config (for the project and tracking URI).")
]

stderr = Console(stderr=True)
stdout = Console()

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The loop's YAML config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set data.seed=7 (repeatable; list items by index)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", help="Workspace folder (default: $TUNELOOP_HOME, else ./.tuneloop).", show_default=False
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def handles_errors(function: F) -> F:
    """Show TuneloopError as a clear message (exit 2), as JSON when --json was asked for."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except TuneloopError as error:
            if kwargs.get("as_json"):
                print(json.dumps({"error": error.message, "hint": error.hint, "type": type(error).__name__}))
            else:
                stderr.print(f"[bold red]error:[/] {error.message}", highlight=False)
                if error.hint:
                    stderr.print(f"[yellow]hint:[/] {error.hint}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


# -- config ---------------------------------------------------------------------------------------------------------
@config_app.command("validate")
@handles_errors
def config_validate(
    file: Annotated[Path, typer.Argument(help="The YAML config to check.")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a config file: unknown keys and wrong types are reported with their field path."""
    from tuneloop.config_file import load_config

    config = load_config(file, overrides)
    if as_json:
        _emit_json({"valid": True, "config": config.model_dump(mode="json")})
    else:
        stdout.print(f"[green]ok[/]: {file} is a valid tuneloop config")


@config_app.command("schema")
@handles_errors
def config_schema(as_json: JsonOption = True) -> None:
    """Print the config's JSON schema (every field with its type, default and description)."""
    from tuneloop.config import LoopConfig

    _emit_json(LoopConfig.model_json_schema())


@config_app.command("docs")
@handles_errors
def config_docs(as_json: JsonOption = False) -> None:
    """Print the config reference as Markdown (this is how docs/config.md is made)."""
    from tuneloop.config_docs import config_reference

    text = config_reference()
    if as_json:
        _emit_json({"markdown": text})
    else:
        sys.stdout.write(text)


# -- data -----------------------------------------------------------------------------------------------------------
@data_app.command("prepare")
@handles_errors
def data_prepare(
    config_file: ConfigOption,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a cached artifact matches.")] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read, check, filter, render, tokenize, split (and pack) the configured sources into a dataset artifact."""
    _quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    prepared = prepare_dataset(config, Workspace.from_env(workspace), force=force, console=stderr)
    summary = prepared.summary()
    if as_json:
        _emit_json(summary)
        return
    _print_prepare_summary(summary)


def _print_prepare_summary(summary: dict[str, Any]) -> None:
    title = f"dataset {summary['dataset_id']}" + (" (cached)" if summary["cache_hit"] else "")
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for source, fmt in summary["detected_formats"].items():
        table.add_row(f"format of {Path(source).name}", fmt)
    table.add_row("rows read", str(summary["rows_read"]))
    table.add_row("train rows", f"{summary['train_rows']} ({summary['train_samples']} samples)")
    table.add_row("validation rows", str(summary["val_rows"]))
    table.add_row("quarantined", str(summary["quarantined"]))
    for reason, count in summary["filtered"].items():
        if count:
            table.add_row(f"  {reason}", str(count))
    tokens = summary["tokens"]
    table.add_row("tokens (trained)", f"{tokens['total']} ({tokens['trainable']})")
    table.add_row("tokens per row p50 / p95 / max", f"{tokens['p50']} / {tokens['p95']} / {tokens['max']}")
    stdout.print(table)
    stdout.print(f"report: {summary['report']}\nquarantine: {summary['quarantine']}")


@data_app.command("demo")
@handles_errors
def data_demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON Lines file.")],
    rows: Annotated[int, typer.Option("--rows", help="How many rows to generate.")] = 3000,
    as_json: JsonOption = False,
) -> None:
    """Write the built-in demo dataset (structured extraction, generated, deterministic) to a file."""
    from tuneloop.data.demo import write_demo

    path = write_demo(out, rows)
    if as_json:
        _emit_json({"path": str(path), "rows": rows})
    else:
        stdout.print(f"wrote {rows} rows to {path}")


# -- train ----------------------------------------------------------------------------------------------------------
@app.command("train")
@handles_errors
def train(
    config_file: ConfigOption,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest unfinished run of this config.")
    ] = False,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Use (or resume) this run id.")] = None,
    sweep: Annotated[int, typer.Option("--sweep", help="Run N Optuna trials over train.sweep.space.")] = 0,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes for data-parallel training (Accelerate).")] = 1,
    accelerate_config: Annotated[
        Path | None, typer.Option("--accelerate-config", help="An Accelerate config (FSDP, DeepSpeed) for --nproc.")
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune the base model (LoRA, QLoRA or full) on the prepared data; prepares the data first if needed."""
    _quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    space = Workspace.from_env(workspace)
    if sweep:
        from tuneloop.train.sweep import run_sweep

        outcome = run_sweep(config, space, sweep, console=stderr)
        if as_json:
            _emit_json(outcome)
        else:
            _print_sweep(outcome)
        return
    if nproc > 1:
        from tuneloop.train.launch import launch_distributed

        result = launch_distributed(
            config_file, overrides or [], space, nproc, resume, run_id, accelerate_config, stderr
        )
    else:
        from tuneloop.train.recipe import describe_failure, train_model

        try:
            result = train_model(config, space, resume=resume, run_id=run_id, console=stderr)
        except (TuneloopError, KeyboardInterrupt):
            raise
        except Exception as error:  # a crash mid-run: the checkpoints stay, say how to resume
            raise describe_failure(error) from error
    if os.environ.get("TUNELOOP_WORKER") == "1":
        return  # a --nproc worker: the launching process prints the summary
    summary = result.summary()
    if config.registry.name:
        from tuneloop.registry.store import Registry
        from tuneloop.registry.versions import register_run

        info = register_run(Registry(config, space), result.run_id, config.registry.name)
        summary["registry"] = {"name": info.name, "version": info.version, "aliases": info.aliases}
    if as_json:
        _emit_json(summary)
        return
    _print_train_summary(summary)


def _print_train_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run_id']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("method", summary["method"] + (f" ({summary['quantization']})" if summary["quantization"] else "")),
        ("precision", summary["precision"]),
        ("steps", str(summary["steps"])),
        ("tokens", f"{summary['tokens']:,}"),
        ("tokens/s", f"{summary['tokens_per_second']:,.1f}"),
        ("train loss (last)", _fmt(summary["train_loss"])),
        ("eval loss", _fmt(summary["eval_loss"])),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB (estimated {summary['memory_estimate_mb']:,} MiB)"),
        ("base weights in memory", f"{summary['model_memory_mb']:,.0f} MiB"),
        ("wall time", f"{summary['wall_seconds']:,.1f} s"),
        ("adapter" if summary["adapter_path"] else "model", summary["adapter_path"] or summary["model_path"]),
        ("mlflow run", summary["mlflow_run_id"] or "-"),
    ]
    if summary.get("registry"):
        rows.append(("registered as", f"{summary['registry']['name']}/{summary['registry']['version']}"))
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)


def _print_sweep(outcome: dict[str, Any]) -> None:
    table = Table(title=f"sweep {outcome['study']} ({len(outcome['trials'])} trials)")
    for column in ("trial", "state", "eval_loss", "params", "run"):
        table.add_column(column)
    for trial in outcome["trials"]:
        marker = " [bold green](best)[/]" if trial["number"] == outcome["best_trial"] else ""
        table.add_row(
            str(trial["number"]) + marker,
            trial["state"],
            _fmt(trial["value"]),
            json.dumps(trial["params"]),
            trial.get("run_id") or "-",
        )
    stdout.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -- eval -----------------------------------------------------------------------------------------------------------
@app.command("eval")
@handles_errors
def evaluate(
    config_file: ConfigOption,
    model: Annotated[str | None, typer.Option("--model", help="A run id, `base`, or a model/adapter folder.")] = None,
    compare: Annotated[str, typer.Option("--compare", help="Compare with this model (`none` to skip).")] = "base",
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluate on this file instead of the validation split.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many rows.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a gate fails.")] = False,
    harness: Annotated[str | None, typer.Option("--harness", help="lm-eval tasks, comma-separated.")] = None,
    harness_include: Annotated[
        Path | None, typer.Option("--harness-include", help="Folder of local lm-eval task YAML.")
    ] = None,
    pairwise: Annotated[
        bool, typer.Option("--pairwise", help="Write a blind A/B sheet of the two models' answers.")
    ] = False,
    import_ratings: Annotated[
        Path | None, typer.Option("--import-ratings", help="Ratings for a pairwise sheet: CSV/JSONL.")
    ] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a model against its base (or another model): perplexity, BLEU/ROUGE, exact match, accuracy,
    safety, generation stats, latency; gates; report.md/report.html; results logged to the run's MLflow run."""
    _quiet_libraries()
    if import_ratings is not None:
        from tuneloop.evaluate.pairwise import import_ratings as read_ratings

        outcome = read_ratings(import_ratings)
        if as_json:
            _emit_json(outcome)
        else:
            low, high = outcome["ci95"]
            stdout.print(
                f"{outcome['model']} preferred in {outcome['preference_rate']:.1%} of {outcome['rated']} "
                f"rated pairs (95% CI {low:.1%}-{high:.1%}; {outcome['wins']} wins, {outcome['ties']} ties, "
                f"{outcome['losses']} losses)"
            )
        return
    from tuneloop.config_file import load_config
    from tuneloop.evaluate.run import run_evaluation
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    summary = run_evaluation(
        config,
        Workspace.from_env(workspace),
        model,
        None if compare == "none" else compare,
        data_file=data,
        limit=limit,
        pairwise=pairwise,
        harness_tasks=[task.strip() for task in harness.split(",")] if harness else None,
        harness_include=harness_include,
        console=stderr,
    )
    if as_json:
        _emit_json({key: value for key, value in summary.items() if key != "details"})
    else:
        _print_eval_summary(summary)
    if strict and not summary["passed"]:
        raise typer.Exit(1)


def _print_eval_summary(summary: dict[str, Any]) -> None:
    labels = list(summary["models"])
    table = Table(title=f"evaluation on {summary['rows']} rows")
    table.add_column("metric")
    for label in labels:
        table.add_column(f"{label}", justify="right")
    if len(labels) > 1:
        table.add_column("delta", justify="right")
    names = sorted({name for values in summary["metrics"].values() for name in values})
    for name in names:
        values = [summary["metrics"][label].get(name) for label in labels]
        cells = [_fmt(value) for value in values]
        if len(labels) > 1:
            cells.append("-" if None in values[:2] else f"{values[0] - values[1]:+.4f}")
        table.add_row(name, *cells)
    stdout.print(table)
    for gate, result in summary["gate_details"].items():
        colour = "green" if result["result"] == "pass" else "red"
        stdout.print(f"gate {gate} ({result['rule']}): {result['value']:.4f} [{colour}]{result['result']}[/]")
    stdout.print(f"report: {summary['report']}")


# -- registry -------------------------------------------------------------------------------------------------------
def _registry(config_file: Path | None, overrides: list[str] | None, workspace: Path | None) -> Any:
    _quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.registry.store import Registry
    from tuneloop.workspace import Workspace

    return Registry(load_config(config_file, overrides), Workspace.from_env(workspace))


@registry_app.command("register")
@handles_errors
def registry_register(
    run: Annotated[str, typer.Argument(help="A finished training run id (or its folder).")],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a training run as a new version, with lineage and a model card."""
    from tuneloop.registry.versions import register_run

    info = register_run(_registry(config_file, overrides, workspace), run, name)
    if as_json:
        _emit_json(info.summary())
    else:
        stdout.print(f"registered [bold]{info.name}/{info.version}[/] from run {info.run_id}; card: {info.model_card}")


@registry_app.command("list")
@handles_errors
def registry_list(
    config_file: ConfigOptionalOption = None, workspace: WorkspaceOption = None, as_json: JsonOption = False
) -> None:
    """Registered models and their versions."""
    registry = _registry(config_file, None, workspace)
    listing = {name: [info.summary() for info in registry.versions(name)] for name in registry.names()}
    if as_json:
        _emit_json(
            {
                name: [
                    {k: v[k] for k in ("version", "aliases", "run_id", "eval_passed", "created_at")} for v in versions
                ]
                for name, versions in listing.items()
            }
        )
        return
    table = Table(title="registered models")
    for column in ("name", "version", "aliases", "run", "eval gates", "created"):
        table.add_column(column)
    for name, versions in listing.items():
        for version in versions:
            gates = {True: "pass", False: "fail", None: "-"}[version["eval_passed"]]
            table.add_row(
                name,
                str(version["version"]),
                ", ".join(version["aliases"]),
                version["run_id"] or "-",
                gates,
                version["created_at"] or "",
            )
    stdout.print(table)


@registry_app.command("show")
@handles_errors
def registry_show(
    reference: Annotated[str, typer.Argument(help="NAME, NAME@alias or NAME/VERSION.")],
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """One version: aliases, base model, data fingerprint, metrics, config, artifact path, model card."""
    info = _registry(config_file, None, workspace).get(reference)
    if as_json:
        payload = info.summary()
        payload.pop("lineage")
        _emit_json(payload)
        return
    table = Table(title=f"{info.name}/{info.version}", show_header=False)
    for key in ("aliases", "run_id", "base_model", "data_fingerprint", "eval_passed", "artifact_path", "model_card"):
        table.add_row(key, str(getattr(info, key)))
    for metric, value in sorted(info.metrics.items()):
        table.add_row(metric, _fmt(value))
    stdout.print(table)


@registry_app.command("alias")
@handles_errors
def registry_alias(
    name: str,
    version: int,
    alias: str,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point ALIAS (champion, challenger, any name) at a version."""
    _registry(config_file, None, workspace).set_alias(name, version, alias)
    if as_json:
        _emit_json({"name": name, "version": version, "alias": alias})
    else:
        stdout.print(f"{name}@{alias} -> {version}")


@registry_app.command("promote")
@handles_errors
def registry_promote(
    name: str,
    version: int,
    force: Annotated[bool, typer.Option("--force", help="Promote even if its eval gates failed.")] = False,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make a version the champion (the old champion becomes `previous`); refuses failed gates unless --force."""
    from tuneloop.registry.versions import promote

    outcome = promote(_registry(config_file, None, workspace), name, version, force, stderr)
    if as_json:
        _emit_json(outcome)
    else:
        stdout.print(
            f"{name}@champion -> {version}"
            + (f" ({name}@previous -> {outcome['previous']})" if outcome["previous"] else "")
        )


@registry_app.command("diff")
@handles_errors
def registry_diff(
    name: str,
    first: int,
    second: int,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Config, data fingerprint and metric differences between two versions."""
    from tuneloop.registry.versions import diff

    outcome = diff(_registry(config_file, None, workspace), name, first, second)
    if as_json:
        _emit_json(outcome)
        return
    table = Table(title=f"{name}: v{first} vs v{second}")
    for column in ("what", f"v{first}", f"v{second}"):
        table.add_column(column)
    for key, values in outcome["config"].items():
        table.add_row(f"config {key}", str(values["a"]), str(values["b"]))
    data = outcome["data_fingerprint"]
    table.add_row("data fingerprint", str(data["a"]), str(data["b"]))
    for key, values in outcome["metrics"].items():
        table.add_row(key, _fmt(values["a"]), _fmt(values["b"]))
    stdout.print(table)


@registry_app.command("delete")
@handles_errors
def registry_delete(
    name: str,
    version: Annotated[int | None, typer.Argument(help="One version; omit to delete the model.")] = None,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a version (or the whole registered model). Training runs and their files stay."""
    _registry(config_file, None, workspace).delete(name, version)
    if as_json:
        _emit_json({"deleted": name if version is None else f"{name}/{version}"})
    else:
        stdout.print(f"deleted {name if version is None else f'{name}/{version}'}")


@app.command("export")
@handles_errors
def export(
    reference: Annotated[str, typer.Argument(help="NAME@alias, NAME/VERSION, a run id, or an adapter folder.")],
    fmt: Annotated[str, typer.Option("--format", help="peft | merged | gguf | gguf-lora")] = "merged",
    quant: Annotated[str, typer.Option("--quant", help="GGUF type: f16 | bf16 | q8_0 | f32")] = "f16",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a model: the PEFT adapter, merged safetensors (parity-checked), or GGUF (read back after writing)."""
    _quiet_libraries()
    import tempfile

    from tuneloop.config_file import load_config
    from tuneloop.evaluate.refs import resolve_model_ref
    from tuneloop.registry import export as exports
    from tuneloop.workspace import Workspace

    config = load_config(config_file)
    space = Workspace.from_env(workspace)
    spec = resolve_model_ref(reference, config, space)
    target = out or space.root / "exports" / f"{reference.replace('/', '-').replace('@', '-')}-{fmt}"
    target.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        if spec.adapter is None:
            raise TuneloopError(f"{reference} is a full model, not an adapter", hint="use --format merged or gguf")
        result = exports.export_peft(spec.adapter, target)
    elif fmt == "merged":
        result = _merged(spec, target, exports)
    elif fmt == "gguf":
        with tempfile.TemporaryDirectory(dir=space.cache) as scratch:
            merged = Path(scratch) if spec.adapter else spec.weights
            if spec.adapter:
                _merged(spec, merged, exports)
            result = exports.export_gguf(merged, target, quant, space)
    elif fmt == "gguf-lora":
        if spec.adapter is None:
            raise TuneloopError(f"{reference} has no adapter to convert", hint="use --format gguf")
        result = exports.export_gguf_lora(spec.base_folder, spec.adapter, target, space)
    else:
        raise TuneloopError(f"unknown --format {fmt!r}", hint="peft, merged, gguf or gguf-lora")
    if as_json:
        _emit_json(result)
    else:
        stdout.print(f"exported {reference} as {fmt}: {result['path']}")


def _merged(spec: Any, target: Path, exports: Any) -> dict[str, Any]:
    if spec.adapter is None:
        import shutil

        shutil.copytree(spec.weights, target, dirs_exist_ok=True)
        return {"format": "merged", "path": str(target), "parity_max_abs_diff": 0.0}
    return exports.export_merged(spec.base_folder, spec.adapter, target)


# -- serve ----------------------------------------------------------------------------------------------------------
@app.command("serve")
@handles_errors
def serve(
    config_file: ConfigOption,
    models: Annotated[
        list[str] | None, typer.Option("--model", help="A model to serve (repeatable): NAME@alias, run id, folder.")
    ] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="auto | transformers")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the OpenAI-compatible gateway in the foreground until SIGTERM/SIGINT, then drain and exit 0."""
    _quiet_libraries()
    import logging

    from tuneloop.config_file import load_config
    from tuneloop.serve.gateway.app import create_app
    from tuneloop.serve.launch import build_engine
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    settings = config.serve
    variants = [variant for route in settings.routes.values() for variant in route.variants]
    wanted = [ref for ref in dict.fromkeys([*(models or settings.models), *variants]) if ref != config.model.base]
    space = Workspace.from_env(workspace)
    chosen = engine or settings.engine
    engine_instance = build_engine(config, space, [] if chosen == "remote" else wanted, chosen)
    keys = settings.api_keys + [key for key in os.environ.get("TUNELOOP_API_KEYS", "").split(",") if key]
    from tuneloop.serve.gateway.batches import BatchStore
    from tuneloop.serve.gateway.feedback import FeedbackStore
    from tuneloop.serve.gateway.routing import Router

    application = create_app(
        engine_instance,
        api_keys=keys,
        max_request_bytes=settings.max_request_bytes,
        max_tokens_limit=settings.max_tokens,
        router=Router(settings.routes, seed=config.project.seed),
        feedback=FeedbackStore(space.root / "serve" / "feedback.jsonl"),
        rate_limit_per_minute=settings.rate_limit_per_minute,
        batch_store=BatchStore(space.root / "serve"),
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [model.name for model in engine_instance.models()]
    listen = f"http://{host or settings.host}:{port or settings.port}"
    if as_json:
        _emit_json({"url": listen, "engine": engine_instance.name, "models": names})
    else:
        stderr.print(f"serving {', '.join(names)} with the {engine_instance.name} engine on {listen}")
    from tuneloop.serve.launch import run_until_signalled

    run_until_signalled(application, host or settings.host, port or settings.port)


@bench_app.command("serve")
@handles_errors
def bench_serve_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of an OpenAI-compatible server.")],
    model: Annotated[str, typer.Option("--model", help="The model name to request.")],
    users: Annotated[int, typer.Option("--users", help="Concurrent simulated users (at most 100).")] = 8,
    requests: Annotated[int, typer.Option("--requests", help="Total requests to send.")] = 64,
    duration: Annotated[float | None, typer.Option("--duration", help="Stop after this many seconds.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens per request.")] = 64,
    data: Annotated[Path | None, typer.Option("--data", help="JSONL with a `prompt` or `instruction` field.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TUNELOOP_API_KEY")] = None,
    as_json: JsonOption = False,
) -> None:
    """Load-test an endpoint: TTFT / inter-token / end-to-end latency percentiles, tokens/s, requests/s, errors."""
    from tuneloop.serve.bench import bench_serve, default_prompts

    if not 1 <= users <= 100:
        raise TuneloopError("--users must be between 1 and 100")
    prompts = default_prompts()
    if data is not None:
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [str(row.get("prompt") or row.get("instruction") or "") for row in rows if isinstance(row, dict)]
        prompts = [prompt for prompt in prompts if prompt] or default_prompts()
    result = bench_serve(url, model, prompts, users, requests, duration, max_tokens, api_key)
    if as_json:
        _emit_json(result)
        return
    table = Table(title=f"{result['requests']} requests, {users} users, {model}")
    table.add_column("metric")
    for column in ("p50", "p95", "p99"):
        table.add_column(column, justify="right")
    for name, label in (
        ("ttft", "time to first token (s)"),
        ("itl", "inter-token latency (s)"),
        ("e2e", "end-to-end latency (s)"),
    ):
        table.add_row(label, *[_fmt(result[f"{name}_p{p}_s"]) for p in (50, 95, 99)])
    stdout.print(table)
    stdout.print(
        f"output tokens/s {result['output_tokens_per_second']:.1f}, requests/s "
        f"{result['requests_per_second']:.2f}, errors {result['errors']}"
    )


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
