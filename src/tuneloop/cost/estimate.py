"""Cost from measured numbers: $ per training run and $ per 1M generated tokens for every compute entry of a price
table, beside API prices per 1M output tokens.

Throughput is never invented: an entry uses the throughput given for its hardware, or `measured` (this machine's
training run and serving benchmark); without either it is listed with no figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from tuneloop.errors import ConfigError
from tuneloop.prices import load_prices as load_prices  # the table is read in the shared layer (eval prices too)


@dataclass
class Measured:
    """What was measured here: a training run and a serving throughput (either may be missing)."""

    training_tokens: int | None = None
    training_tokens_per_second: float | None = None
    training_wall_seconds: float | None = None
    training_nodes: int = 1  # machines the run used: each is billed for the whole run
    serving_tokens_per_second: float | None = None
    run_id: str | None = None
    serving_source: str | None = None


Platform = Literal["cpu", "k8s-gpu", "modal", "runpod", "sagemaker"]
PLATFORMS: tuple[str, ...] = get_args(Platform)


def estimate_costs(
    table: dict[str, Any], measured: Measured, platform: Platform | None = None, stated_tps: float | None = None
) -> dict[str, Any]:
    """Every compute entry (only `platform`'s, when given) priced at its throughput: declared in the table,
    `measured` here, or `stated_tps` (the throughput of the platform's hardware, measured there by the user) for
    entries that declare none."""
    rows = []
    per_million: dict[str, float | None] = {}
    per_run: dict[str, float | None] = {}
    entries = (table.get("compute") or {}).items()
    if platform is not None:
        entries = [(name, entry) for name, entry in entries if entry.get("platform") == platform]
        if not entries:
            raise ConfigError(f"the price table has no compute entry with platform: {platform}")
    for name, entry in entries:
        usd_per_hour = (
            float(entry["usd_per_hour"]) if "usd_per_hour" in entry else float(entry["usd_per_second"]) * 3600
        )
        declared = entry.get("serving_tokens_per_second")
        stated = declared is None and platform is not None and stated_tps is not None
        if stated:
            declared = stated_tps
        serving = _throughput(declared, measured.serving_tokens_per_second)
        training = _throughput(entry.get("training_tokens_per_second"), measured.training_tokens_per_second)
        million = round(usd_per_hour / (serving * 3600) * 1e6, 4) if serving else None
        run = None
        if training and measured.training_tokens:
            run = round(usd_per_hour * measured.training_nodes * measured.training_tokens / training / 3600, 6)
        per_million[name], per_run[name] = million, run
        rows.append(
            {
                "name": name,
                "kind": "compute",
                "usd_per_hour": round(usd_per_hour, 4),
                "serving_tokens_per_second": serving,
                "platform": entry.get("platform"),
                "serving_basis": "stated (--serving-tps)" if stated else _basis(declared, serving),
                "usd_per_million_tokens": million,
                "training_tokens_per_second": training,
                "usd_per_training_run": run,
            }
        )
    api = {
        name: {
            "usd_per_million_output_tokens": float(entry["usd_per_million_output_tokens"]),
            "usd_per_million_input_tokens": entry.get("usd_per_million_input_tokens"),
        }
        for name, entry in (table.get("api") or {}).items()
    }
    cheapest_api = min((value["usd_per_million_output_tokens"] for value in api.values()), default=None)
    known = {name: value for name, value in per_million.items() if value is not None}
    for row in rows:  # side by side with buying the tokens
        row["vs_cheapest_api"] = (
            round(row["usd_per_million_tokens"] / cheapest_api, 3)
            if row["usd_per_million_tokens"] is not None and cheapest_api
            else None
        )
    return {
        "platform": platform,
        "measured": measured.__dict__,
        "compute": rows,
        "api": api,
        "usd_per_million_tokens": per_million,
        "usd_per_training_run": per_run,
        "cheapest_compute": min(known, key=known.__getitem__) if known else None,
        "cheapest_api_usd_per_million_output_tokens": cheapest_api,
    }


def _throughput(declared: Any, measured: float | None) -> float | None:
    if declared == "measured":
        return measured
    return float(declared) if declared is not None else None


def _basis(declared: Any, value: float | None) -> str:
    if value is None:
        return "unmeasured"  # no throughput for that hardware: measure it there
    return "measured here" if declared == "measured" else "price table"


def cost_markdown(result: dict[str, Any]) -> str:
    """The cost section of a report."""
    measured = result["measured"]
    lines = [
        "## Cost",
        "",
        f"Measured here: training run `{measured['run_id']}` "
        f"({_fmt(measured['training_tokens'], 0)} tokens at {_fmt(measured['training_tokens_per_second'], 1)} tokens/s, "
        f"{_fmt(measured['training_wall_seconds'], 0)} s); serving {_fmt(measured['serving_tokens_per_second'], 1)} "
        f"output tokens/s ({measured['serving_source'] or 'not measured'}).",
        "",
        "| compute | $/hour | serving tokens/s | basis | $ per 1M tokens | $ per training run |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for row in result["compute"]:
        lines.append(
            f"| {row['name']} | {row['usd_per_hour']:.4f} | {_fmt(row['serving_tokens_per_second'], 1)} | "
            f"{row['serving_basis']} | {_fmt(row['usd_per_million_tokens'], 4)} | {_fmt(row['usd_per_training_run'], 6)} |"
        )
    lines += ["", "| API | $ per 1M output tokens | $ per 1M input tokens |", "|---|---:|---:|"]
    for name, prices in result["api"].items():
        lines.append(
            f"| {name} | {prices['usd_per_million_output_tokens']:.2f} | "
            f"{_fmt(prices['usd_per_million_input_tokens'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"
