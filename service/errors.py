"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and their statuses.

Bad input is a 400 that says what to change (never a 5xx, so clients do not retry it), a bad LoRA
adapter included (`LoRAError`, with the engine's message); an unknown model or adapter 404; a full
queue 429 with Retry-After; not ready or draining 503 with Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.client import EngineDead
from engine.lora import UnknownLoRA
from engine.request import InvalidParams
from engine.scheduler import QueueFull
from service.protocol import ErrorInfo, ErrorResponse

RETRY_AFTER_S = 1

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(
            message=self.message, type=_TYPES.get(self.status, "error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(error: BaseException) -> APIError:
    """Map engine and validation exceptions to API errors; anything unexpected is a 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidParams):
        return APIError(400, str(error), param=error.param)
    if isinstance(error, UnknownLoRA):  # before ValueError: LoRAError is one
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, ValueError | TypeError | OverflowError):
        return APIError(400, str(error))
    if isinstance(error, QueueFull):
        return APIError(429, f"server is overloaded: {error}", code="queue_full", retry_after=True)
    if isinstance(error, EngineDead):
        return APIError(503, f"the engine is not available: {error}", code="engine_dead", retry_after=True)
    return APIError(500, f"internal error: {type(error).__name__}", code="internal_error")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems = error.errors()
    first = problems[0] if problems else {}
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    details = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', '')}"
        for e in problems[:5]
    )
    return f"{len(problems)} validation error(s): {details}", location


def error_code(request: Request) -> str | None:
    """The `code` of the error this request was answered with (None: no error, or one without code)."""
    code: str | None = getattr(request.state, "error_code", None)
    return code


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        api_error = as_api_error(error)
        request.state.error_code = api_error.code  # read back by the metrics middleware
        return api_error.response()

    async def on_validation(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        message, param = _validation_message(error)
        return APIError(400, message, param=param).response()

    async def on_http(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        return APIError(error.status_code, str(error.detail)).response()

    # Every class `as_api_error` maps to a 4xx/503 gets its own handler: only a handler for `Exception`
    # runs in Starlette's ServerErrorMiddleware, which re-raises after responding (a logged traceback,
    # a closed keep-alive connection, and a response the counting middleware never sees).
    for kind in (APIError, InvalidParams, ValueError, TypeError, OverflowError, QueueFull, EngineDead):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)
