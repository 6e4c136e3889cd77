"""The service behind the routes: model checks, prompts, admission, and whole or streamed responses."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from engine.client import EngineClient
from engine.lora import UnknownLoRA
from engine.request import TokenLogprob, Usage
from service.choices import ChoiceEnd, ChoiceEvent, ChoiceRun, ChoiceSpec, StopMatcher, admit_all, merge
from service.errors import APIError
from service.logprobs import ChatLogprobFormatter, CompletionLogprobFormatter
from service.metrics import Metrics
from service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DiffusionParams,
    ModelList,
    UsageInfo,
)
from service.served_models import Adapter, ServedModel, ServedModels, model_not_found
from service.settings import Settings

__all__ = ["Accepted", "Collected", "ServedModel", "Service", "add_usage"]  # ServedModel: its old home


@dataclass
class Collected:
    """A non-streamed request's result: per choice its text, finish reason and logprob entries."""

    texts: list[str]
    reasons: list[str | None]
    usage: UsageInfo
    logprobs: list[list[TokenLogprob] | None]


@dataclass
class Accepted:
    """An admitted request: its id, the merged choice events, and what the response needs."""

    request_id: str
    events: AsyncGenerator[ChoiceEvent, None]
    num_choices: int
    prompt_tokens: int
    prompt_texts: list[str]
    model: str
    """The served name the request asked for (the base's, or an adapter's): the responses' `model`."""


class Service:
    """Everything a route needs; owns no engine state (the engine client does)."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Any,
        model: ServedModel,
        settings: Settings,
        adapters: list[Adapter] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings
        self.served = ServedModels(model, engine, adapters or [], settings.enable_lora)
        self.metrics = metrics
        self.draining = False

    # -- checks ----------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.engine.is_alive and not self.draining

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down: retry on another replica",
                code="draining",
                retry_after=True,
            )
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running", code="engine_dead", retry_after=True)

    def check_model(self, name: str | None) -> str | None:
        """The adapter a request's `model` picks (None: the base model); a 404 for an unknown name."""
        return self.served.resolve(name)

    def models(self) -> ModelList:
        return ModelList(data=self.served.cards())

    # -- prompts ---------------------------------------------------------------------------------

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        raw = request.prompt
        items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", "prompt")
        if len(items) > self.settings.max_prompts_per_request:
            raise APIError(
                400,
                f"{len(items)} prompts exceed the limit of {self.settings.max_prompts_per_request}",
                "prompt",
            )
        return [self._tokens(item) for item in items]

    def _tokens(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt is empty: give at least one character or token", "prompt")
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
            self._check_chars(item)
            return list(self.tokenizer(item).input_ids)
        return list(item)  # the engine checks the ids (InvalidParams -> 400)

    def _check_chars(self, text: str) -> None:
        """Refuse texts that cannot fit before paying for tokenisation (no token is shorter than 1 char
        plus the tokenizer's 4x worst case): a cheap guard against huge bodies."""
        if len(text) > 16 * self.model.max_model_len:
            raise APIError(
                400,
                f"prompt has {len(text)} characters, far beyond max_model_len={self.model.max_model_len} "
                "tokens: shorten it",
                "prompt",
            )

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        for message in messages:
            self._check_chars(message["content"])
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=request.add_generation_prompt,
                tokenize=True,
                **(request.chat_template_kwargs or {}),
            )
        except Exception as error:  # jinja errors: the messages do not fit the template
            raise APIError(400, f"the chat template rejected these messages: {error}", "messages") from error
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return list(ids)

    # -- running ---------------------------------------------------------------------------------

    async def accept(
        self,
        request: DiffusionParams,
        prompts: list[list[int]],
        max_tokens: int | None,
        prefix: str,
        model: str | None = None,
    ) -> Accepted:
        """Admit every choice and return the merged event stream (nothing sent yet). `model` is the
        request's `model` (None: the base). The engine checks the request (`InvalidParams`, a 400
        naming the field; `UnknownLoRA`, a 404, for an adapter unloaded meanwhile) as it admits it."""
        lora_name = self.check_model(model)
        self.check_ready()
        if request.n > self.settings.max_n:
            raise APIError(400, f"n={request.n} exceeds the limit of {self.settings.max_n}", "n")
        specs = []
        for p, prompt in enumerate(prompts):
            for c in range(request.n):
                params = request.sampling_params(max_tokens, self.model.canvas_length, c)
                specs.append(ChoiceSpec(p * request.n + c, prompt, params))
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        options = request.stream_options
        want_canvas = bool(options and options.include_canvas)
        try:
            streams = await admit_all(self.engine, specs, request_id, want_canvas, lora_name)
        except UnknownLoRA as error:  # unloaded between the check above and the engine's admission
            raise model_not_found(model or "", self.model.name, self.served.adapter_names) from error
        interval = self._canvas_interval(request)
        on_end = self._adapter_counter(lora_name)
        runs = [
            ChoiceRun(
                spec, stream, self.tokenizer, StopMatcher(request.stop_strings), interval, request_id, on_end
            )
            for spec, stream in zip(specs, streams, strict=True)
        ]
        texts = [self.tokenizer.decode(p) if self.tokenizer is not None else "" for p in prompts]
        served_name = model or self.model.name
        return Accepted(request_id, merge(runs), len(specs), sum(len(p) for p in prompts), texts, served_name)

    def _adapter_counter(self, lora_name: str | None) -> ChoiceEnd | None:
        """What counts an adapter's choices in the per-adapter metrics as they end (None: the base's
        requests, which the engine's own counters cover)."""
        metrics = self.metrics
        if lora_name is None or metrics is None:
            return None
        return functools.partial(metrics.observe_lora_choice, lora_name)

    def _canvas_interval(self, request: DiffusionParams) -> float:
        options = request.stream_options
        if options is not None and options.canvas_min_interval_ms is not None:
            return options.canvas_min_interval_ms / 1000
        return self.settings.canvas_min_interval_s

    async def collect(self, accepted: Accepted) -> Collected:
        """Run a non-streamed request to the end: texts, finish reasons, usage, logprobs."""
        result = Collected(
            [""] * accepted.num_choices,
            [None] * accepted.num_choices,
            UsageInfo(prompt_tokens=accepted.prompt_tokens),
            [None] * accepted.num_choices,
        )
        async for event in accepted.events:
            result.texts[event.index] += event.text
            if event.logprobs is not None:
                result.logprobs[event.index] = (result.logprobs[event.index] or []) + event.logprobs
            if event.finish_reason is not None:
                result.reasons[event.index] = event.finish_reason
                add_usage(result.usage, event.usage)
        result.usage.total_tokens = result.usage.prompt_tokens + result.usage.completion_tokens
        return result

    def completion_logprobs(
        self, accepted: Accepted, request: CompletionRequest
    ) -> CompletionLogprobFormatter:
        """The completions formatter; with `echo`, token offsets start after the echoed prompt."""
        per_prompt = max(1, accepted.num_choices // max(1, len(accepted.prompt_texts)))
        starts = {
            i: len(accepted.prompt_texts[i // per_prompt]) if request.echo else 0
            for i in range(accepted.num_choices)
        }
        return CompletionLogprobFormatter(self.tokenizer, starts)

    def completion_response(
        self, accepted: Accepted, request: CompletionRequest, collected: Collected
    ) -> CompletionResponse:
        per_prompt = max(1, accepted.num_choices // max(1, len(accepted.prompt_texts)))
        formatter = self.completion_logprobs(accepted, request)
        choices = [
            CompletionChoice(
                index=i,
                text=(accepted.prompt_texts[i // per_prompt] if request.echo else "") + text,
                logprobs=None
                if entries is None
                else CompletionLogprobs.model_validate(formatter(i, entries)),
                finish_reason=collected.reasons[i],
            )
            for i, (text, entries) in enumerate(zip(collected.texts, collected.logprobs, strict=True))
        ]
        usage = collected.usage
        return CompletionResponse(id=accepted.request_id, model=accepted.model, choices=choices, usage=usage)

    def chat_response(self, accepted: Accepted, collected: Collected) -> ChatCompletionResponse:
        formatter = ChatLogprobFormatter(self.tokenizer)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=text),
                logprobs=None if entries is None else ChatLogprobs.model_validate(formatter(i, entries)),
                finish_reason=collected.reasons[i],
            )
            for i, (text, entries) in enumerate(zip(collected.texts, collected.logprobs, strict=True))
        ]
        usage = collected.usage
        return ChatCompletionResponse(
            id=accepted.request_id, model=accepted.model, choices=choices, usage=usage
        )


def add_usage(total: UsageInfo, usage: Usage | None) -> None:
    """Prompt tokens are counted once per prompt by the caller; the rest adds up over choices."""
    if usage is None:
        return
    total.completion_tokens += usage.completion_tokens
    details = total.prompt_tokens_details  # summed over choices, never above the prompt tokens
    details.cached_tokens = min(total.prompt_tokens, details.cached_tokens + usage.cached_tokens)
    total.denoise_steps += usage.denoise_steps
    total.canvases += usage.canvases
