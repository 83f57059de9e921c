"""The `tuneloop` command line. Thin by design: parse arguments, call one stage function, print a table or --json.
One module per stage registers its commands on the apps declared here."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="tuneloop: data -> training -> evaluation -> registry -> serving, in one tool.", no_args_is_help=True
)
config_app = typer.Typer(help="Validate and document the config file.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Load tests and benchmarks.", no_args_is_help=True)
registry_app = typer.Typer(help="Model registry: versions, aliases, lineage, model cards.", no_args_is_help=True)
rate_app = typer.Typer(help="Human evaluation: ratings report, Label Studio export/import.", no_args_is_help=True)
ab_app = typer.Typer(help="Online A/B tests: preference rates and whether a difference is real.", no_args_is_help=True)
dvc_app = typer.Typer(help="The loop as a DVC pipeline: dvc.yaml stages, params from the config.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(registry_app, name="registry")
app.add_typer(rate_app, name="rate")
app.add_typer(ab_app, name="ab")
app.add_typer(dvc_app, name="dvc")

# Registering the commands (imported for their decorators).
from tuneloop.cli import (  # noqa: E402
    ab_commands,
    config_commands,
    cost_commands,
    data_commands,
    deploy_commands,
    dvc_commands,
    eval_commands,
    launch_commands,
    rate_commands,
    registry_commands,
    run_commands,
    serve_commands,
    train_commands,
)

__all__ = [
    "ab_commands",
    "app",
    "config_commands",
    "cost_commands",
    "data_commands",
    "deploy_commands",
    "dvc_commands",
    "eval_commands",
    "launch_commands",
    "rate_commands",
    "registry_commands",
    "run_commands",
    "serve_commands",
    "train_commands",
]


def main() -> None:  # pragma: no cover - console entry point alias
    app()
