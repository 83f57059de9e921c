"""The data report: report.md and a self-contained report.html (counts per filter, token-length histogram, one
rendered sample with its loss mask, the first quarantined rows)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from tuneloop.artifacts.dataset import DatasetManifest
from tuneloop.workspace import DatasetPaths


def write_report(
    out: DatasetPaths,
    dataset: DatasetManifest,
    sample: dict[str, Any] | None,
    token_lengths: list[int],
    quarantine_preview: list[dict[str, Any]],
) -> None:
    manifest = dataset.model_dump(mode="json", by_alias=True)
    _histogram(token_lengths, dataset.packing.max_seq_len, out.histogram)
    out.report_md.write_text(_markdown(manifest, sample, quarantine_preview, out.histogram.name), encoding="utf-8")
    environment = Environment(loader=PackageLoader("tuneloop.data", "templates"), autoescape=select_autoescape())
    page = environment.get_template("report.html.j2").render(
        manifest=manifest,
        sample=sample,
        quarantine=quarantine_preview,
        histogram=base64.b64encode(out.histogram.read_bytes()).decode("ascii"),
    )
    out.report_html.write_text(page, encoding="utf-8")


def _histogram(lengths: list[int], max_seq_len: int, path: Path) -> None:
    # A Figure of its own, not pyplot: switching pyplot's backend would take inline plots from a notebook user.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2), dpi=100)
    axes = figure.subplots()
    axes.hist(lengths or [0], bins=min(50, max(5, len(set(lengths)))), color="#3b7dd8")
    axes.axvline(max_seq_len, color="#d8553b", linestyle="--", label=f"max_seq_len={max_seq_len}")
    axes.set_xlabel("tokens per row")
    axes.set_ylabel("rows")
    axes.set_title("Token length distribution (kept rows)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _markdown(
    manifest: dict[str, Any], sample: dict[str, Any] | None, quarantine: list[dict[str, Any]], histogram_name: str
) -> str:
    counts, tokens = manifest["counts"], manifest["tokens"]
    lines = [
        f"# Data report: {manifest['dataset_id']}",
        "",
        f"Base model `{manifest['model']['base']}` (chat template: {manifest['model']['chat_template_source']}), "
        f"created {manifest['created_at']} in {manifest['seconds']} s.",
        "",
        "## Sources",
        "",
        "| source | format | rows read | usable |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| `{s['path']}` | {s['format']} | {s['rows_read']} | {s['rows_usable']} |" for s in manifest["sources"]]
    lines += [
        "",
        "## Counts",
        "",
        "| | rows |",
        "|---|---:|",
        f"| read | {counts['rows_read']} |",
        f"| kept | {counts['kept']} |",
        f"| train | {counts['train_rows']} ({counts['train_samples']} samples) |",
        f"| validation | {counts['val_rows']} |",
        f"| quarantined | {counts['quarantined']} |",
        "",
        "## Filtered, by reason",
        "",
        "| reason | rows |",
        "|---|---:|",
    ]
    lines += [f"| {reason} | {count} |" for reason, count in counts["filtered"].items()]
    packing = manifest["packing"]
    lines += [
        "",
        "## Tokens",
        "",
        f"Total {tokens['total']}, trained {tokens['trainable']}, per row mean {tokens['mean']}, p50 {tokens['p50']}, "
        f"p95 {tokens['p95']}, max {tokens['max']}; truncated rows: {tokens['truncated_rows']}. "
        f"Packing: {_packing_summary(packing)}.",
        "",
        f"![token lengths]({histogram_name})",
        "",
    ]
    if sample:
        lines += [
            "## One rendered sample",
            "",
            f"From `{sample['source']}` line {sample['line']}. Tokens that carry loss are inside ⟦ ⟧.",
            "",
            "```",
            mask_markup(sample["tokens"], sample["trained"]),
            "```",
            "",
        ]
    if quarantine:
        lines += ["## First quarantined rows", "", "| source | line | reason | detail |", "|---|---:|---|---|"]
        lines += [
            f"| `{Path(entry['source']).name}` | {entry['line'] if entry['line'] is not None else '#' + str(entry['row'])} "
            f"| {entry['reason']} | {html.escape(str(entry['detail'])).replace('|', '/')} |"
            for entry in quarantine
        ]
        lines += ["", "Every rejected row is in `quarantine.jsonl` with its source, line and reason.", ""]
    return "\n".join(lines)


def mask_markup(tokens: list[str], trained: list[bool]) -> str:
    """Text with the trained stretches wrapped in ⟦ ⟧."""
    parts: list[str] = []
    inside = False
    for piece, is_trained in zip(tokens, trained, strict=True):
        if is_trained != inside:
            parts.append("⟦" if is_trained else "⟧")
            inside = is_trained
        parts.append(piece)
    if inside:
        parts.append("⟧")
    return "".join(parts)


def _packing_summary(packing: dict[str, Any]) -> str:
    if not packing["enabled"]:
        return "off"
    length = f"{packing['length']}-token samples, " if packing.get("length") else ""
    return f"on, {length}efficiency {packing['efficiency']}"
