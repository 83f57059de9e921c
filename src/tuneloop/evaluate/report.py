"""The evaluation report: report.md and a self-contained report.html with the metrics table (model, comparison,
delta), gate results, plots (metric bars, output-length histograms) and side-by-side sample outputs."""

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
    context = {
        "summary": report.model_dump(mode="json"),
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


def _metric_bars(outcomes: list[Any], names: list[str]) -> bytes | None:
    unit = [
        name
        for name in names
        if all(0 <= outcome.metrics.get(name, 0) <= 1 for outcome in outcomes) and name not in ("ttft_s", "mean_nll")
    ]
    if not unit:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(max(6, len(unit) * 0.9), 3.6), dpi=100)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 3.2), dpi=100)
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
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
