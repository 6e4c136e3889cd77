"""What the server lets in: API keys, CORS, and a limit on request bodies.

- Keys (`--api-key`, `CANVAS_SERVE_API_KEY`, `VLLM_API_KEY`, `--api-key-file`): every path needs
  `Authorization: Bearer <key>` except `OPEN_PATHS` (probes, the scrape, the page) and `OPEN_PREFIXES`
  (the page's static files). Routes added later are therefore protected by default. A missing or wrong
  key is a 401 in OpenAI's error shape. The sent key is compared with every configured key in constant
  time (SHA-256 digests of equal length, `hmac.compare_digest`, no early exit).
- CORS (`--allowed-origins/-methods/-headers`, `--allow-credentials`): without allowed origins no CORS
  header is sent, so browsers keep the same-origin rule. CORS is the outermost layer, so preflights are
  answered without a key and refusals (401, 413) carry the headers a permitted page needs to read them.
- Body limit (`--max-request-body-bytes`): a declared Content-Length above it is a 413 before anything
  is read; otherwise the bytes are counted as they arrive (chunked bodies too) and the read that
  crosses the limit raises `BodyTooLarge`, answered as a 413.

Layers, outermost first: CORS -> keys -> body limit -> the app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path  # the path the router matches: the same, by construction
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError
from service.settings import Settings

logger = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/", "/health", "/ready", "/metrics"})
"""Paths served without a key: liveness and readiness probes, the Prometheus scrape, the page."""
OPEN_PREFIXES = ("/static/",)
"""Path prefixes served without a key: the page's scripts and styles (no data of any request)."""


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the body limit, the key check (when keys are configured) and CORS (when origins are) to
    `app`, in that order, so CORS ends outermost."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_exception_handler(BodyTooLarge, _too_large)
    _require_keys(app, settings.api_keys())
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )


def _require_keys(app: FastAPI, keys: list[str]) -> None:
    if not keys:
        logger.info("no API key configured: every route is open (see --api-key)")
        return
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    open_to = ", ".join([*sorted(OPEN_PATHS), *(f"{prefix}*" for prefix in OPEN_PREFIXES)])
    logger.info("API key required (%d accepted) on every route but %s", len(keys), open_to)


def is_open(path: str) -> bool:
    """Whether `path` (without the root path) is served without a key."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


# -- API keys ----------------------------------------------------------------------------------------


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    """Answers 401 to any request outside the open paths without a configured key as its Bearer token."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        if not keys:
            raise ValueError("ApiKeyMiddleware needs at least one key")
        self.app = app
        self.digests = [_digest(key) for key in keys]

    def is_accepted(self, authorization: str | None) -> bool:
        """Whether the header is `Bearer <a configured key>`; compares with every key, in constant time."""
        scheme, _, token = (authorization or "").partition(" ")
        sent = _digest(token.strip())
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(sent, digest)
        return matched and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_open(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        if self.is_accepted(authorization):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
        else:
            await _unauthorized(missing=authorization is None)(scope, receive, send)


def _unauthorized(missing: bool) -> JSONResponse:
    message = (
        "this server needs an API key: send it as the header `Authorization: Bearer <key>` "
        "(the `openai` client: api_key=...)"
        if missing
        else "the API key is not valid for this server: check the key sent as `Authorization: Bearer <key>`"
    )
    response = APIError(401, message, code="invalid_api_key").response()
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


# -- request body size -------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """A request body crossed `max_bytes` while being read (raised from inside `receive`)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            413,
            f"the request body exceeds this server's limit of {max_bytes:,} bytes "
            "(--max-request-body-bytes): send fewer or shorter prompts per request",
        )

    def response(self) -> JSONResponse:
        return APIError(413, str(self.detail), code="request_too_large").response()


async def _too_large(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BodyTooLarge)
    return error.response()


class BodyLimitMiddleware:
    """413 for a body larger than `max_bytes`: at once for a declared Content-Length, else from the read
    that crosses it (chunked uploads without a length, or a length that understates the body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
            return
        num_read = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal num_read
            message = await receive()
            if message["type"] == "http.request":
                num_read += len(message.get("body", b""))
                if num_read > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as error:  # read outside a route's handlers: answer here, unless too late
            if started:
                raise
            await error.response()(scope, receive, send)
