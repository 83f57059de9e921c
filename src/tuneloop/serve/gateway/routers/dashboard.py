"""Routes: GET /dashboard (the built-in web dashboard) and GET /dashboard/data.json (the same data as JSON)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from tuneloop.serve.gateway.state import GatewayState, gateway

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


def dashboard_data(state: GatewayState) -> dict[str, Any]:
    import time

    from tuneloop.monitor.collect import registry_versions, sample_value, serving_stats, training_runs

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


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(state: State) -> HTMLResponse:
    import asyncio

    from tuneloop.monitor.dashboard import render_dashboard

    data = await asyncio.to_thread(dashboard_data, state)  # reads files and MLflow's SQLite store
    return HTMLResponse(render_dashboard(data))


@router.get("/dashboard/data.json")
async def dashboard_json(state: State) -> dict[str, Any]:
    import asyncio

    return await asyncio.to_thread(dashboard_data, state)
