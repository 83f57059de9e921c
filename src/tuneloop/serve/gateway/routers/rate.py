"""Routes: GET /dashboard/rate (evaluation folders to rate), GET /dashboard/rate/session (the next blind item for a
rater), POST /dashboard/rate/session (store a rating, then show the next item). Server-rendered HTML forms, no
JavaScript; every text is escaped by the template (answers are model output)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from tuneloop.artifacts.ratings import HIGHEST_SCORE, LOWEST_SCORE, RATING_MODES
from tuneloop.config import DEFAULT_RUBRIC
from tuneloop.monitor.dashboard import TEMPLATES
from tuneloop.serve.gateway.errors import GatewayError
from tuneloop.serve.gateway.ratings import EvalFolder, RatingSession, eval_folders, find_folder
from tuneloop.serve.gateway.state import GatewayState, gateway
from tuneloop.workspace import Workspace

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]
_templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))


def _workspace(state: GatewayState) -> Workspace:
    if state.workspace is None:
        raise GatewayError(404, "this gateway has no workspace: start it with `tuneloop serve`")
    return state.workspace


def _rubric(request: Request) -> dict[str, str]:
    return getattr(request.app.state, "rubric", None) or dict(DEFAULT_RUBRIC)


def session_url(folder: str, rater: str, mode: str, pair: int) -> str:
    return "/dashboard/rate/session?" + urlencode({"folder": folder, "rater": rater, "mode": mode, "pair": pair})


@router.get("/dashboard/rate", response_class=HTMLResponse)
async def rate_index(state: State) -> HTMLResponse:
    folders = await asyncio.to_thread(eval_folders, _workspace(state))
    listed = await asyncio.to_thread(lambda: [_folder_summary(folder) for folder in folders])
    html = _templates.get_template("rate_index.html.j2").render(folders=listed, modes=RATING_MODES)
    return HTMLResponse(html)


def _folder_summary(folder: EvalFolder) -> dict[str, Any]:
    try:  # a damaged file is shown on its folder's line, not as a broken page
        rows, ratings = folder.rows, folder.ratings()
    except GatewayError as error:
        return {"key": folder.key, "id": folder.id, "error": error.message}
    return {
        "key": folder.key,
        "id": folder.id,
        "rows": len(rows),
        "labels": folder.labels,
        "pairs": [f"{first} vs {other}" for first, other in folder.pairs()],
        "ratings": len(ratings),
        "raters": sorted({rating.rater for rating in ratings}),
    }


@router.get("/dashboard/rate/session", response_class=HTMLResponse)
async def rate_session(
    request: Request,
    state: State,
    folder: Annotated[str, Query()],
    rater: Annotated[str, Query()],
    mode: Annotated[str, Query()] = "pairwise",
    pair: Annotated[int, Query()] = 1,
) -> HTMLResponse:
    found = await asyncio.to_thread(find_folder, _workspace(state), folder)
    session = await asyncio.to_thread(RatingSession.open, found, rater, mode, pair)
    return HTMLResponse(_render_session(session, _rubric(request)))


@router.post("/dashboard/rate/session")
async def rate_submit(request: Request, state: State) -> RedirectResponse:
    form = {name: value for name, value in (await request.form()).items() if isinstance(value, str)}
    for required in ("folder", "rater", "mode"):
        if not form.get(required):
            raise GatewayError(400, f"the form has no {required}", param=required)
    pair = form.get("pair") or "1"
    if not pair.isdigit():
        raise GatewayError(400, f"pair must be a whole number, not {pair!r}", param="pair")
    found = await asyncio.to_thread(find_folder, _workspace(state), form["folder"])
    session = await asyncio.to_thread(RatingSession.open, found, form["rater"], form["mode"], int(pair))
    await asyncio.to_thread(session.record, form, list(_rubric(request)))
    return RedirectResponse(session_url(found.id, session.rater, session.mode, session.pair), status_code=303)


def _render_session(session: RatingSession, rubric: dict[str, str]) -> str:
    item = session.next_item()
    answers: dict[str, str] = {}
    conversation: list[dict[str, str]] = []
    if item is not None:
        answers = {shown: item.row.outputs[label] for shown, label in item.answers.items()}
        # The turns the answers reply to (system prompt, earlier turns), or the prompt alone.
        turns = list(item.row.messages)
        if turns and turns[-1].get("role") == "assistant":  # the reference, shown apart
            turns = turns[:-1]
        conversation = [{"role": str(turn.get("role", "")), "content": str(turn.get("content", ""))} for turn in turns]
        conversation = conversation or [{"role": "user", "content": item.row.prompt}]
    return _templates.get_template("rate_session.html.j2").render(
        folder=session.folder.id,
        rater=session.rater,
        mode=session.mode,
        pair=session.pair,
        item=item,
        conversation=conversation,
        reference=item.row.reference if item is not None else "",
        answers=answers,
        rubric=rubric,
        scores=range(LOWEST_SCORE, HIGHEST_SCORE + 1),
        rated=len(session.rated),
        total=len(session.items),
        index_url="/dashboard/rate",
    )
