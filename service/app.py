"""`create_app(service, metrics)`: the FastAPI application and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service.errors import install_error_handlers
from service.metrics import Metrics
from service.routes import router
from service.serving import Service
from service.ui import install_ui

REJECTION_REASONS = {400: "invalid", 429: "queue_full", 503: "unavailable"}


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

    @app.middleware("http")
    async def count_responses(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe_http(request.method, getattr(route, "path", "unmatched"), response.status_code)
        if response.status_code in REJECTION_REASONS:
            metrics.observe_rejected(REJECTION_REASONS[response.status_code])
        return response

    return app
