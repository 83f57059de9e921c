"""What /dashboard shows, gathered from the gateway's state: engine and models, live serving statistics, A/B
variants with preference rates, registry versions and training runs."""

from __future__ import annotations

import time
from typing import Any

from tuneloop.monitor.collect import registry_versions, sample_value, serving_stats, training_runs
from tuneloop.serve.gateway.state import GatewayState


def dashboard_data(state: GatewayState) -> dict[str, Any]:
    feedback = {(row["model"], row["variant"]): row for row in state.feedback.summary()}
    variants = []
    for route, config in state.router.routes.items():
        for variant, weight in config.variants.items():
            row = feedback.get((route, variant), {})
            variants.append(
                {
                    "route": route,
                    "variant": variant,
                    "weight": weight,
                    "responses": row.get("responses", 0),
                    "ratings": row.get("ratings", 0),
                    "preference_rate": row.get("preference_rate"),
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
