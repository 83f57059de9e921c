"""`tuneloop run`: the whole loop in one command."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import (
    ConfigOption,
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


@app.command("run")
@handles_errors
def run(
    config_file: ConfigOption,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Prepare -> train -> eval vs base -> register -> promote when the gates pass. Unchanged steps are skipped;
    after a crash, run it again to resume."""
    quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.pipeline.run import run_pipeline
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    summary = run_pipeline(config, Workspace.from_env(workspace), console=stderr)
    summary["serve_command"] = summary["serve_command"].replace("CONFIG", str(config_file))
    if as_json:
        emit_json(summary)
        return
    print_run_summary(summary)


def print_run_summary(summary: dict[str, Any]) -> None:
    data, training = summary["data"], summary["training"]
    overview = Table(title="tuneloop run", show_header=False)
    overview.add_column("what")
    overview.add_column("value")
    overview.add_row(
        "dataset",
        f"{summary['dataset_id']}: {data['train_rows']} train / {data['val_rows']} val rows, "
        f"{data['quarantined']} quarantined, {sum(data['filtered'].values())} filtered",
    )
    overview.add_row(
        "training",
        f"run {summary['run_id']}: {training['steps']} steps in "
        f"{training['wall_seconds']:.0f} s, {training['tokens_per_second']:,.0f} tokens/s, "
        f"train loss {fmt(training['train_loss'])}",
    )
    registry = summary["registry"]
    if registry:
        overview.add_row(
            "registry", f"{registry['name']}/{registry['version']} [{', '.join(registry['aliases']) or 'no alias'}]"
        )
    overview.add_row("promoted", "yes" if summary["promoted"] else "no")
    overview.add_row("cached steps", ", ".join(summary["steps_skipped"]) or "none")
    overview.add_row("wall time", f"{summary['wall_seconds']:.0f} s")
    stdout.print(overview)

    metrics = summary["metrics"]
    labels = list(metrics)
    table = Table(title="evaluation (gates on the tuned model)")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("gate")
    names = sorted(
        {name for values in metrics.values() for name, value in values.items() if isinstance(value, int | float)}
    )
    for name in names:
        gate = summary["gates"].get(name, "")
        style = {"pass": "[green]pass[/]", "fail": "[red]fail[/]"}.get(gate, gate)
        table.add_row(name, *[fmt(metrics[label].get(name)) for label in labels], style)
    stdout.print(table)
    stdout.print(f"report: {summary['eval_report']}")
    stdout.print(f"serve it: [bold]{summary['serve_command']}[/]")
