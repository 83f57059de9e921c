"""The evaluation report: report.md and a self-contained report.html with the metrics table (model, comparison,
delta), gate results, notes (API usage and cost, skipped metrics), the LLM judge's summary, plots (metric bars,
output-length histograms) and side-by-side sample outputs."""

from __future__ import annotations

import base64
import io
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.workspace import EvalPaths


def write_eval_report(out: EvalPaths, report: EvalReport, outcomes: list[Any], rows: Any, samples: int) -> None:
    labels = [outcome.spec.label for outcome in outcomes]
    names = sorted({name for outcome in outcomes for name in outcome.metrics})
    table = []
    for name in names:
        values = [outcome.metrics.get(name) for outcome in outcomes]
        delta = values[0] - values[1] if len(values) > 1 and None not in values[:2] else None
        table.append({"name": name, "values": values, "delta": delta})
    sample_rows = [
        {
            "prompt": rows.prompts[i][-1]["content"],
            "reference": rows.references[i],
            "outputs": [outcome.outputs[i] if outcome.outputs else "" for outcome in outcomes],
        }
        for i in range(min(samples, len(rows.prompts)))
    ]
    plots = {"metrics": _metric_bars(outcomes, names), "lengths": _length_histograms(outcomes)}
    for name, png in plots.items():
        if png:
            out.plot(name).write_bytes(png)
    notes = [
        (outcome.spec.label, note)
        for outcome in outcomes
        for note in [*outcome.details.get("notes", []), outcome.details.get("cost")]
        if note
    ]
    context = {
        "summary": report.model_dump(mode="json"),
        "notes": notes,
        "judge": report.judge,
        "labels": labels,
        "table": table,
        "samples": sample_rows,
        "outcomes": outcomes,
        "plots": {name: base64.b64encode(png).decode() for name, png in plots.items() if png},
    }
    environment = Environment(loader=PackageLoader("tuneloop.evaluate", "templates"), autoescape=select_autoescape())
    out.report_html.write_text(environment.get_template("report.html.j2").render(**context), encoding="utf-8")
    out.report_md.write_text(_markdown(context), encoding="utf-8")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _significance_markdown(significance: dict[str, dict[str, Any]], labels: list[str]) -> list[str]:
    lines = [
        f"## Is the difference real? ({labels[0]} - {labels[1]}, paired on the same rows)",
        "",
        "| metric | difference | 95% CI | p-value | test | significant |",
        "|---|---:|---|---:|---|---|",
    ]
    for metric, test in significance.items():
        low, high = test["ci95"]
        lines.append(
            f"| {metric} | {test['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] | {test['p_value']:.4g} | "
            f"{test['test']} | {'**yes**' if test['significant'] else 'no'} |"
        )
    return lines


def _markdown(context: dict[str, Any]) -> str:
    summary, labels = context["summary"], context["labels"]
    header = "| metric | " + " | ".join(labels) + (" | delta |" if len(labels) > 1 else "")
    lines = [
        "# Evaluation report",
        "",
        "Models: "
        + ", ".join(f"**{label}** = `{ref}`" for label, ref in summary["models"].items())
        + f". Rows: {summary['rows']} from `{summary['data']}`.",
        "",
        header,
        "|---|" + "---:|" * (len(labels) + (1 if len(labels) > 1 else 0)),
    ]
    for row in context["table"]:
        cells = [_fmt(value) for value in row["values"]]
        if len(labels) > 1:
            cells.append(_fmt(row["delta"]))
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if summary["gate_details"]:
        lines += ["", "## Gates", "", "| gate | rule | value | result |", "|---|---|---:|---|"]
        for gate, result in summary["gate_details"].items():
            lines.append(f"| {gate} | {result['rule']} | {_fmt(result['value'])} | **{result['result']}** |")
    if summary.get("significance"):
        lines += ["", *_significance_markdown(summary["significance"], labels)]
    if context["notes"]:
        lines += ["", "## Notes", ""] + [f"- **{label}**: {note}" for label, note in context["notes"]]
    if context["judge"]:
        lines += ["", *_judge_markdown(context["judge"])]
    lines += ["", "![metrics](metrics.png)", "", "![output lengths](lengths.png)", ""]
    if context["samples"]:
        lines += ["## Sample outputs", ""]
        for index, sample in enumerate(context["samples"], start=1):
            lines += [
                f"### {index}",
                "",
                f"**prompt:** {sample['prompt']}",
                "",
                f"**reference:** {sample['reference']}",
                "",
            ]
            lines += [f"**{label}:** {output}" for label, output in zip(labels, sample["outputs"], strict=True)]
            lines.append("")
    return "\n".join(lines)


def _judge_markdown(judge: dict[str, Any]) -> list[str]:
    lines = [
        "## LLM judge",
        "",
        f"Judge: `{judge['judge']}`; {judge['calls']} calls, {judge['unparsed']} without a verdict "
        f"({judge['errors']} failed requests), {judge['prompt_tokens']} prompt + {judge['completion_tokens']} "
        f"completion tokens{_judge_cost(judge)}. Rule: {judge['rule']}. Every reply: `{judge['file']}`.",
    ]
    if judge["pairs"]:
        lines += [
            "",
            "| pair | wins | ties | losses | unparsed | win rate | 95% CI |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for pair in judge["pairs"]:
            rate = pair.get("judge_win_rate")
            interval = (
                f"{pair['judge_win_rate_ci_low']:.3f}-{pair['judge_win_rate_ci_high']:.3f}" if rate is not None else "-"
            )
            lines.append(
                f"| {pair['models'][0]} vs {pair['models'][1]} | {pair['judge_wins']} | {pair['judge_ties']} | "
                f"{pair['judge_losses']} | {pair['unparsed']} | {_fmt(rate)} | {interval} |"
            )
    if judge["grades"]:
        dimensions = judge["dimensions"]
        lines += ["", "| model (1-5) | " + " | ".join(dimensions) + " |", "|---|" + "---:|" * len(dimensions)]
        for label, scores in judge["grades"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(scores.get(d)) for d in dimensions) + " |")
    if judge["examples"]:
        lines += ["", "Some of the judge's reasons:", ""]
        for example in judge["examples"]:
            about = (
                f"{example['a']} (A) vs {example['b']} (B)"
                if example["kind"] == "pairwise"
                else f"{example['model']}, {example['dimension']}"
            )
            reply = " ".join(example["reply"].split())
            lines.append(f"- `{example['id']}` {about}: {reply[:400]}")
    return lines


def _judge_cost(judge: dict[str, Any]) -> str:
    return f" (${judge['cost_usd']:.6f})" if judge.get("cost_usd") is not None else ""


# Metrics that are counts or dollars, not rates: never drawn on the 0-1 bar chart.
_NOT_RATES = {"ttft_s", "mean_nll", "eval_cost_usd", "judge_wins", "judge_ties", "judge_losses", "judge_unparsed"}


def _metric_bars(outcomes: list[Any], names: list[str]) -> bytes | None:
    unit = [
        name
        for name in names
        if all(0 <= outcome.metrics.get(name, 0) <= 1 for outcome in outcomes) and name not in _NOT_RATES
    ]
    if not unit:
        return None
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6, len(unit) * 0.9), 3.6), dpi=100)
    axes = figure.subplots()
    width = 0.8 / len(outcomes)
    positions = np.arange(len(unit))
    for index, outcome in enumerate(outcomes):
        axes.bar(
            positions + index * width, [outcome.metrics.get(name, 0) for name in unit], width, label=outcome.spec.label
        )
    axes.set_xticks(positions + width * (len(outcomes) - 1) / 2, unit, rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_title("Metrics on a 0-1 scale")
    axes.legend()
    figure.tight_layout()
    return _png(figure)


def _length_histograms(outcomes: list[Any]) -> bytes | None:
    if not any(outcome.output_lengths for outcome in outcomes):
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.2), dpi=100)
    axes = figure.subplots()
    for outcome in outcomes:
        if outcome.output_lengths:
            axes.hist(outcome.output_lengths, bins=20, alpha=0.6, label=outcome.spec.label)
    axes.set_xlabel("generated tokens")
    axes.set_ylabel("rows")
    axes.set_title("Output length")
    axes.legend()
    figure.tight_layout()
    return _png(figure)


def _png(figure: Any) -> bytes:
    """The figure as PNG bytes. Figures are made with matplotlib.figure.Figure, not pyplot, so reports never switch
    the process's plotting backend (a notebook keeps its inline plots)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
