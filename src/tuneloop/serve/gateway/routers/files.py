"""Routes of the OpenAI Files + Batches API: /v1/files, /v1/files/{id}[/content], /v1/batches[/{id}[/cancel]]."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, UploadFile
from fastapi.responses import Response

from tuneloop.serve.gateway.errors import GatewayError, not_found
from tuneloop.serve.gateway.protocol import BatchCreateRequest
from tuneloop.serve.gateway.state import GatewayState, gateway

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


@router.post("/v1/files")
async def upload_file(file: UploadFile, state: State, purpose: str = Form(...)) -> dict[str, Any]:
    content = await file.read()
    if purpose == "batch":
        for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    raise GatewayError(400, f"line {number} of {file.filename} is not JSON", param="file") from None
    return state.batches().add_file(file.filename or "upload.jsonl", purpose, content)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, state: State) -> Any:
    return not_found(state.batches().file(file_id), "file", file_id, "file_id")


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, state: State) -> Response:
    content = not_found(state.batches().file_content(file_id), "file", file_id, "file_id")
    return Response(content, media_type="application/jsonl")


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, state: State) -> dict[str, Any]:
    store = state.batches()
    input_file = store.file(body.input_file_id)
    if input_file is None:
        raise GatewayError(400, f"no file {body.input_file_id!r}", param="input_file_id")
    if input_file["purpose"] != "batch":  # only those were checked line by line at upload
        raise GatewayError(
            400, f"file {body.input_file_id!r} was not uploaded with purpose `batch`", param="input_file_id"
        )
    job = store.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata)
    store.start(job, state.serving.batch_item)
    return job


@router.get("/v1/batches")
async def list_batches(state: State) -> dict[str, Any]:
    return {"object": "list", "data": state.batches().all(), "has_more": False}


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, state: State) -> Any:
    return not_found(state.batches().get(batch_id), "batch", batch_id, "batch_id")


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, state: State) -> Any:
    # Only a job still validating or in progress becomes `cancelling`; whichever replica runs it then stops.
    return not_found(state.batches().cancel(batch_id), "batch", batch_id, "batch_id")
