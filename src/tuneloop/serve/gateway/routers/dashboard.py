"""Routes: GET /dashboard (the built-in web dashboard) and GET /dashboard/data.json (the same data as JSON)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from tuneloop.serve.gateway.dashboard_data import dashboard_data
from tuneloop.serve.gateway.state import GatewayState, gateway

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


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
