"""`create_app(service, metrics)`: the FastAPI application and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service.errors import error_code, install_error_handlers
from service.metrics import Metrics, rejection_reason
from service.routes import router
from service.security import install_security
from service.serving import Service
from service.ui import install_ui

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
"""The routes whose error responses are refused requests (a 503 from /ready is no request refused)."""


def create_app(service: Service, metrics: Metrics) -> FastAPI:
    """The app serving `service`; its lifespan starts and stops the engine loop."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            service.engine.shutdown()

    app = FastAPI(title="canvas-serve", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    install_ui(app)  # GET / (the live canvas page), /static, /v1/engine/*
    install_security(app, service.settings)  # API keys, CORS, body limit (before the counting below)

    @app.middleware("http")
    async def count_responses(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        path = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.observe_http(request.method, path, response.status_code)
        reason = rejection_reason(response.status_code, error_code(request))
        if path in GENERATION_ROUTES and reason is not None:
            metrics.observe_rejected(reason)
        return response

    return app
