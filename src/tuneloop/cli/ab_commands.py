"""`tuneloop ab report`: per A/B route and variant the preference rate with its interval, the difference against
the route's control with a p-value, and a verdict in words; from a live gateway or its feedback file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tuneloop.cli import ab_app
from tuneloop.cli.common import (
    ConfigOptionalOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    handles_errors,
    stdout,
)
from tuneloop.errors import DataError, TuneloopError


@ab_app.command("report")
@handles_errors
def ab_report(
    url: Annotated[
        str | None,
        typer.Option("--url", help="A running gateway (e.g. http://127.0.0.1:8000): reads its /dashboard/data.json."),
    ] = None,
    feedback: Annotated[
        Path | None,
        typer.Option(
            "--feedback",
            help="A gateway's feedback file (default: <workspace>/serve/feedback.jsonl); -c names each route's control.",
        ),
    ] = None,
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Preference rate per variant with its 95% interval, and each variant against its route's control (the first
    variant in serve.routes): difference, 95% interval, Fisher's exact p-value and a verdict."""
    if url and feedback:
        raise TuneloopError("give --url or --feedback, not both")
    if url:
        source, rows = url, _from_gateway(url)
    else:
        source, rows = _from_file(feedback, config_file, overrides, workspace)
    if as_json:
        emit_json({"source": source, "variants": rows})
        return
    _print_report(source, rows)


def _from_gateway(url: str) -> list[dict[str, Any]]:
    import httpx

    address = url.rstrip("/") + "/dashboard/data.json"
    try:
        response = httpx.get(address, timeout=30)
        response.raise_for_status()
        return response.json()["variants"]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        raise TuneloopError(
            f"could not read the A/B variants from {address}: {error}",
            hint="is `tuneloop serve` running there? --url takes the gateway's base URL",
        ) from None


def _from_file(
    feedback: Path | None, config_file: Path | None, overrides: list[str] | None, workspace: Path | None
) -> tuple[str, list[dict[str, Any]]]:
    from tuneloop.serve.gateway.feedback import FeedbackStore, route_controls
    from tuneloop.workspace import Workspace

    path = feedback or Workspace.from_env(workspace).serve.feedback
    if not path.is_file():
        raise DataError(
            f"no feedback file at {path}",
            hint="pass --feedback FILE, --workspace of the gateway, or --url of a running gateway",
        )
    controls: dict[str, str] = {}
    if config_file is not None:
        from tuneloop.config_file import load_config

        controls = route_controls(load_config(config_file, overrides).serve.routes)
    rows = []
    for row in FeedbackStore(path).summary(controls):
        if row["variant"] is None:  # a model asked for directly, not through an A/B route
            continue
        control = controls.get(row["model"])
        is_control = row["vs_control"] is None if control is None else row["variant"] == control
        # Served counts live only in the running gateway: the file knows ratings.
        rows.append({"route": row["model"], "control": is_control, "weight": None, **row, "responses": None})
    return str(path), rows


def _print_report(source: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        stdout.print(f"no A/B ratings in {source}")
        return
    table = Table(title=f"A/B report ({source})")
    for column in ("route", "variant", "responses", "ratings", "preference [95% CI]", "vs control [95% CI]", "p"):
        table.add_column(column, justify="left" if column in ("route", "variant") else "right")
    table.add_column("verdict", justify="left")
    for row in rows:
        versus = row.get("vs_control")
        table.add_row(
            row["route"],
            row["variant"],
            "-" if row["responses"] is None else str(row["responses"]),
            str(row["ratings"]),
            _rate(row["preference_rate"], row["preference_ci95"]),
            "control" if row["control"] else _difference(versus),
            "-" if versus is None or versus["p_value"] is None else f"{versus['p_value']:.3g}",
            "" if versus is None else versus["verdict"],
        )
    stdout.print(table)
    stdout.print(
        "preference = share of positive ratings (up, 4, 5); Wilson 95% interval. vs control: difference in preference "
        "rate with Newcombe's 95% interval; p from Fisher's exact test (significant below 0.05)."
    )


def _rate(rate: float | None, interval: list[float] | None) -> str:
    if rate is None or interval is None:
        return "-"
    return f"{rate:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"


def _difference(versus: dict[str, Any] | None) -> str:
    if versus is None or versus["difference"] is None:
        return "-"
    low, high = versus["ci95"]
    return f"{versus['difference'] * 100:+.1f} pts [{low * 100:+.1f}, {high * 100:+.1f}]"
