"""Thin HTTP handlers: parse, hand to the Service, shape the response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from service.errors import APIError
from service.logprobs import ChatLogprobFormatter
from service.metrics import Metrics
from service.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from service.serving import Service
from service.streaming import chat_choice, completion_choice, stream_events

T = TypeVar("T")
router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 500, 503)
}


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: the process and its engine loop are alive (503 once the loop has died)."""
    alive = service.engine.is_alive or not service.engine.started
    return JSONResponse({"status": "ok" if alive else "engine dead"}, status_code=200 if alive else 503)


@router.get("/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: model loaded, engine loop alive, not draining."""
    if service.is_ready:
        return JSONResponse({"status": "ready"})
    reason = "draining" if service.draining else "engine not running"
    return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(service: ServiceDep, metrics: MetricsDep) -> Response:
    metrics.collect_engine(service.engine.stats)
    metrics.collect_loras(service.engine.requests())
    metrics.set_engine_alive(service.engine.is_alive)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.post("/reset_prefix_cache", responses={400: {"model": ErrorResponse}})
async def reset_prefix_cache(service: ServiceDep) -> Response:
    """Forget every cached prefix block (vLLM's route): later requests compute their prompts again."""
    if not await service.engine.call_utility("reset_prefix_cache"):
        raise APIError(400, "prefix caching is off (--no-enable-prefix-caching): there is nothing to reset")
    return Response(status_code=200)


@router.get("/v1/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    """The base model, then every LoRA adapter served beside it (`parent`: the base)."""
    return service.models()


LORA_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 503)}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=LORA_ERRORS)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, service: ServiceDep) -> PlainTextResponse:
    """Load a LoRA adapter at run time (vLLM's route; needs --allow-runtime-lora-updating)."""
    check_runtime_lora_updating(service)
    await service.served.load(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=LORA_ERRORS)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, service: ServiceDep) -> PlainTextResponse:
    """Unload a LoRA adapter (vLLM's route; needs --allow-runtime-lora-updating). New requests for it
    are refused at once; the answer comes once its requests in flight have finished."""
    check_runtime_lora_updating(service)
    await service.served.unload(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def check_runtime_lora_updating(service: Service) -> None:
    """vLLM serves these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING: a 404 without our flag."""
    if not service.settings.allow_runtime_lora_updating:
        raise APIError(
            404,
            "loading and unloading LoRA adapters at run time is off: start the server with "
            "--allow-runtime-lora-updating (or CANVAS_SERVE_ALLOW_RUNTIME_LORA_UPDATING=1)",
            code="runtime_lora_updating_disabled",
        )


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    prompts = service.completion_prompts(body)
    accepted = await service.accept(body, prompts, body.max_tokens, "cmpl", body.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = service.completion_logprobs(accepted, body) if body.logprobs is not None else None
        events = stream_events(
            accepted, accepted.model, "text_completion", completion_choice, include_usage, None, formatter
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    collected = await until_disconnect(request, service.collect(accepted))
    return service.completion_response(accepted, body, collected)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    prompt = service.chat_prompt(body)
    accepted = await service.accept(body, [prompt], body.output_limit, "chatcmpl", body.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        roles = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(accepted.num_choices)
        ]
        formatter = ChatLogprobFormatter(service.tokenizer) if body.logprobs else None
        events = stream_events(
            accepted,
            accepted.model,
            "chat.completion.chunk",
            chat_choice,
            include_usage,
            roles,
            formatter,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    collected = await until_disconnect(request, service.collect(accepted))
    return service.chat_response(accepted, collected)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client goes away first; then cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise APIError(499, "client disconnected", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
