"""`tuneloop registry ...` and `tuneloop export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tuneloop.cli import app, registry_app
from tuneloop.cli.common import (
    ConfigOptionalOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    fmt,
    handles_errors,
    quiet_libraries,
    stderr,
    stdout,
)
from tuneloop.registry.export import ExportFormat


def _registry(config_file: Path | None, overrides: list[str] | None, workspace: Path | None) -> Any:
    quiet_libraries()
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
        emit_json(info.summary())
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
        emit_json(
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
        emit_json(payload)
        return
    table = Table(title=f"{info.name}/{info.version}", show_header=False)
    for key in ("aliases", "run_id", "base_model", "data_fingerprint", "eval_passed", "artifact_path", "model_card"):
        table.add_row(key, str(getattr(info, key)))
    for metric, value in sorted(info.metrics.items()):
        table.add_row(metric, fmt(value))
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
        emit_json({"name": name, "version": version, "alias": alias})
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
        emit_json(outcome)
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
        emit_json(outcome)
        return
    table = Table(title=f"{name}: v{first} vs v{second}")
    for column in ("what", f"v{first}", f"v{second}"):
        table.add_column(column)
    for key, values in outcome["config"].items():
        table.add_row(f"config {key}", str(values["a"]), str(values["b"]))
    data = outcome["data_fingerprint"]
    table.add_row("data fingerprint", str(data["a"]), str(data["b"]))
    for key, values in outcome["metrics"].items():
        table.add_row(key, fmt(values["a"]), fmt(values["b"]))
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
        emit_json({"deleted": name if version is None else f"{name}/{version}"})
    else:
        stdout.print(f"deleted {name if version is None else f'{name}/{version}'}")


@app.command("export")
@handles_errors
def export(
    reference: Annotated[str, typer.Argument(help="NAME@alias, NAME/VERSION, a run id, or an adapter folder.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="peft | merged | gguf | gguf-lora | gptq | awq (4-bit, for vLLM)")
    ] = "merged",
    quant: Annotated[
        str,
        typer.Option(
            "--quant", help="GGUF type: f16 | bf16 | q8_0 | f32, or q4_k_m, q5_k_m, q4_0 ... (llama-quantize)"
        ),
    ] = "f16",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="gptq | awq: a data file to calibrate on (any format data prepare reads)."),
    ] = None,
    config_file: ConfigOptionalOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a model: the PEFT adapter, merged safetensors (parity-checked), GGUF (read back after writing), or
    4-bit GPTQ/AWQ weights for vLLM (compressed-tensors; agreement with the unquantised model reported)."""
    quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.registry.export import export as export_model
    from tuneloop.workspace import Workspace

    result = export_model(
        reference, fmt, quant, out, load_config(config_file), Workspace.from_env(workspace), calibration
    )
    if as_json:
        emit_json(result)
    else:
        stdout.print(f"exported {reference} as {fmt}: {result['path']}")
        if "top1_agreement" in result:
            stdout.print(
                f"{result['scheme']} group {result['group_size']}: top-1 agreement {result['top1_agreement']:.3f}, "
                f"mean KL {result['mean_kl']:.4f} on {result['held_out_texts']} held-out texts, "
                f"{result['size_bytes'] / 2**20:.1f} MiB"
            )
