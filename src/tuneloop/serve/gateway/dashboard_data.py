"""What /dashboard shows, gathered from the gateway's state: engine and models, live serving statistics, A/B
variants with preference rates, their intervals and each variant against its route's control (the first variant),
registry versions and training runs."""

from __future__ import annotations

import time
from typing import Any

from tuneloop.monitor.collect import registry_versions, sample_value, serving_stats, training_runs
from tuneloop.serve.gateway.feedback import compare_to_control, route_controls
from tuneloop.serve.gateway.state import GatewayState

Row = dict[str, Any]


def dashboard_data(state: GatewayState) -> dict[str, Any]:
    controls = route_controls(state.router.routes)
    feedback = {(row["model"], row["variant"]): row for row in state.feedback.summary(controls)}
    variants = []
    for route, config in state.router.routes.items():
        for variant, weight in config.variants.items():
            row = feedback.get((route, variant), {})
            variants.append(
                {
                    "route": route,
                    "variant": variant,
                    "control": variant == controls[route],
                    "weight": weight,
                    "responses": row.get("responses", 0),
                    "ratings": row.get("ratings", 0),
                    "positive": row.get("positive", 0),
                    "preference_rate": row.get("preference_rate"),
                    "preference_ci95": row.get("preference_ci95"),
                    "vs_control": row.get("vs_control") or _unrated(route, variant, controls[route], feedback),
                }
            )
    workspace, registry = state.workspace, state.registry
    return {
        "engine": state.engine.name,
        "served": [model.name for model in state.engine.models()],
        "uptime": round(time.time() - state.started_at, 1),
        "in_flight": int(sample_value(state.metrics.registry, "tuneloop:num_requests_running") or 0),
        "serving": serving_stats(state.metrics.registry, state.started_at),
        "variants": variants,
        "versions": registry_versions(registry()) if registry is not None else [],
        "runs": training_runs(workspace) if workspace is not None else [],
    }


def _unrated(route: str, variant: str, control: str, feedback: dict[tuple[str, str | None], Row]) -> Row | None:
    """The comparison for a variant nothing was rated for yet (the summary only lists what was served or rated)."""
    if variant == control:
        return None
    empty = {"variant": variant, "positive": 0, "ratings": 0, "preference_rate": None}
    return compare_to_control(empty, feedback.get((route, control), empty), control)
