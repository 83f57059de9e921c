"""The gateway's built-in web dashboard (`/dashboard`): one server-rendered HTML page (no JavaScript, so it works
behind any proxy and in a headless browser), refreshed every 10 s, with inline SVG loss curves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"


def render_dashboard(data: dict[str, Any]) -> str:
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    environment.filters["num"] = _number
    environment.globals["curve"] = loss_curve_svg
    return environment.get_template("dashboard.html.j2").render(**data, rendered_at=time.strftime("%H:%M:%S"))


def loss_curve_svg(
    train: list[tuple[float, float]], evaluation: list[tuple[float, float]], width: int = 320, height: int = 120
) -> str:
    """An SVG line chart of training (blue) and eval (orange) loss against steps."""
    points = train + evaluation
    if not points:
        return '<svg width="320" height="120"><text x="10" y="60" fill="#888">no loss logged yet</text></svg>'
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    low_step, high_step = min(steps), max(steps) or 1
    low, high = min(losses), max(losses)
    span_step, span = (high_step - low_step) or 1, (high - low) or 1
    pad = 24

    def xy(step: float, loss: float) -> str:
        x = pad + (step - low_step) / span_step * (width - 2 * pad)
        y = height - pad - (loss - low) / span * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    lines = []
    for series, color in ((train, "#2563eb"), (evaluation, "#ea580c")):
        if series:
            path = " ".join(xy(step, loss) for step, loss in series)
            lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
            lines += [
                f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="2.5" fill="{color}"/>'
                for s, v in series[-1:]
            ]
    axis = (
        f'<text x="{pad}" y="12" font-size="10" fill="#555">loss {high:.3f}</text>'
        f'<text x="{pad}" y="{height - 6}" font-size="10" fill="#555">{low:.3f} · steps {low_step:g}-{high_step:g}</text>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#ccc"/>'
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="loss curve">{axis}{"".join(lines)}</svg>'


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
