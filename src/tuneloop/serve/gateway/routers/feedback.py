"""Routes: POST /v1/feedback (a rating against a response id), GET /v1/feedback/summary (preference per variant)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from tuneloop.serve.gateway.errors import GatewayError
from tuneloop.serve.gateway.feedback import FeedbackRequest, route_controls
from tuneloop.serve.gateway.state import GatewayState, gateway

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


@router.post("/v1/feedback")
async def post_feedback(body: FeedbackRequest, state: State) -> dict[str, Any]:
    entry = state.feedback.record(body)
    if entry is None:
        raise GatewayError(
            404, f"no response with id {body.response_id!r}", code="response_not_found", param="response_id"
        )
    return {"object": "feedback", **entry}


@router.get("/v1/feedback/summary")
async def feedback_summary(state: State) -> dict[str, Any]:
    # Each variant is compared with its route's control, the first variant in `serve.routes`, as on /dashboard.
    return {"object": "list", "data": state.feedback.summary(route_controls(state.router.routes))}
