"""Gateway errors in OpenAI's format: every bad input is a 4xx JSON error, never a 5xx; an engine that cannot
answer is a 503."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tuneloop.errors import TuneloopError
from tuneloop.serve.gateway.protocol import error_body


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.kind, self.code, self.param)


def engine_unavailable(error: TuneloopError) -> dict[str, object]:
    return error_body(error.message, "server_error", "engine_unavailable")


def not_found(value: object, what: str, identifier: str, param: str) -> object:
    """`value`, or a 404 naming what was looked up."""
    if value is None:
        raise GatewayError(404, f"no {what} {identifier!r}", param=param)
    return value


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(TuneloopError)
    async def engine_error(_: Request, error: TuneloopError) -> JSONResponse:
        return JSONResponse(engine_unavailable(error), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            reason = (first.get("ctx") or {}).get("error")
            message = "the request body is not valid JSON" + (f": {reason}" if reason else "")
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if not location and first.get("type") == "missing":
            message = "the request needs a JSON body"
        else:
            message = f"{location}: {first.get('msg', 'invalid request')}" if location else str(first.get("msg", error))
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_value", location or None), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)
