"""The live canvas page (`GET /`, static files under `/static`) and the engine view it reads.

- `GET /v1/engine/status`: one JSON snapshot of the engine (see `service.engine_view`);
- `GET /v1/engine/events`: the same snapshot pushed as SSE (`data: <json>`) every `interval_ms`; the
  stream ends by itself after `EVENTS_MAX_S` or when the server starts draining, so it never holds up
  a shutdown (clients reconnect);
- `GET /v1/engine/tokens?ids=1,2,3`: each id's text, so the page can label canvas positions.

The page itself is plain HTML, CSS and ES modules shipped in the package: no build step, no CDN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from service.engine_view import EngineView
from service.errors import APIError
from service.streaming import sse

STATIC_DIR = Path(__file__).resolve().parent / "static"
EVENTS_MAX_S = 60.0
MAX_TOKEN_IDS = 4096
NO_CACHE = {"Cache-Control": "no-cache"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter()


def install_ui(app: FastAPI) -> None:
    """Add the page, its static files and the engine-view routes to `app` (needs `app.state.service`
    and `app.state.metrics`)."""
    app.state.engine_view = EngineView(app.state.service, app.state.metrics)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def engine_view(request: Request) -> EngineView:
    view: EngineView = request.app.state.engine_view
    return view


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


@router.get("/v1/engine/status")
async def engine_status(request: Request) -> JSONResponse:
    """Running and waiting requests (id, canvas, step), KV use, last step, committed tok/s, steps/canvas."""
    return JSONResponse(engine_view(request).snapshot(), headers=NO_CACHE)


@router.get("/v1/engine/events")
async def engine_events(
    request: Request, interval_ms: Annotated[int, Query(ge=50, le=10_000)] = 250
) -> StreamingResponse:
    """The engine snapshot as server-sent events, a few times per second."""
    view = engine_view(request)
    return StreamingResponse(
        _snapshots(view, interval_ms / 1000), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _snapshots(view: EngineView, interval_s: float) -> AsyncIterator[str]:
    deadline = time.monotonic() + EVENTS_MAX_S
    yield f"retry: {int(interval_s * 4000)}\n\n"
    while True:
        yield sse(view.snapshot())  # a draining server still sends one, so clients see `draining`
        if time.monotonic() >= deadline or view.service.draining:
            return
        await asyncio.sleep(interval_s)


@router.get("/v1/engine/tokens")
async def token_texts(request: Request, ids: Annotated[str, Query(max_length=65536)]) -> JSONResponse:
    """`{"tokens": [text of each id]}` (special tokens by name), for labelling canvas positions."""
    service = request.app.state.service
    token_ids = _parse_ids(ids, service.model.vocab_size)
    tokenizer = service.tokenizer
    texts: list[Any] = [
        tokenizer.decode([t], skip_special_tokens=False) if tokenizer is not None else str(t)
        for t in token_ids
    ]
    return JSONResponse({"ids": token_ids, "tokens": texts})


def _parse_ids(ids: str, vocab_size: int) -> list[int]:
    try:
        token_ids = [int(part) for part in ids.split(",") if part.strip()]
    except ValueError as error:
        raise APIError(400, "ids must be comma-separated integers, e.g. ids=5,6,7", "ids") from error
    if len(token_ids) > MAX_TOKEN_IDS:
        raise APIError(400, f"{len(token_ids)} ids exceed the limit of {MAX_TOKEN_IDS}: ask in parts", "ids")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", "ids")
    return token_ids
