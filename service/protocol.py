"""OpenAI-compatible request and response models, plus our diffusion extensions.

Unknown request fields are accepted and ignored (benchmark clients send vLLM extras such as
`ignore_eos`); fields we cannot honour are rejected with a message. Pydantic stops here:
`to_sampling_params` turns a request into the engine's `SamplingParams`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from engine.request import FREE, MAX_LOGPROBS, RANGES, GrammarSpec, SamplingParams
from service.structured import ResponseFormat, StructuredOutputs, grammar_spec

MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 64
"""Stop strings one request may give (each is searched for in every text delta)."""
MAX_STOP_STRING_CHARS = 256
"""Characters of the longest stop string (streamed text is held back by up to this many)."""


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    include_canvas: bool = False
    """Stream live canvases: chunks with empty text and a top-level `canvas` object."""
    canvas_min_interval_ms: float | None = Field(None, ge=0, allow_inf_nan=False)
    """Least time between two canvas chunks of one choice (each canvas's final snapshot always comes)."""


def _range(name: str) -> Any:
    """A field whose range `SamplingParams` checks (once, as a 400 naming the field): only documented here."""
    schema: dict[str, Any] = {**RANGES[name].json_schema()}
    return Field(None, json_schema_extra=schema)


class DiffusionParams(OpenAIModel):
    """Per-request sampler knobs; unset ones take the checkpoint's generation_config.json.

    Pydantic checks only types and the service's own fields (n, top_p, seed, stop, streaming); the
    engine's `SamplingParams` and `Engine.add_request` check every value they use, once.
    """

    max_denoising_steps: int | None = _range("max_denoising_steps")
    entropy_bound: float | None = _range("entropy_bound")
    t_min: float | None = _range("t_min")
    t_max: float | None = _range("t_max")
    stability_threshold: int | None = _range("stability_threshold")
    confidence_threshold: float | None = _range("confidence_threshold")
    pinned_canvas: list[int | None] | None = None
    """Infilling: a token id per position of the first canvas to pin there, or null to leave free."""
    temperature: float | None = _range("temperature")
    """Scales the whole temperature schedule (t_min and t_max); 0 samples almost greedily."""
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(
        None,
        description=f"Stop strings, cut from the text: at most {MAX_STOP_STRINGS}, each of at most "
        f"{MAX_STOP_STRING_CHARS} characters.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    """OpenAI's structured outputs: {"type": "json_schema", "json_schema": {...}}, {"type": "json_object"}."""
    structured_outputs: StructuredOutputs | None = None
    """vLLM's structured outputs: exactly one of json, regex, choice, grammar."""
    _grammar: GrammarSpec | None = PrivateAttr(None)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        longest = max((len(s) for s in stops), default=0)
        if len(stops) > MAX_STOP_STRINGS or longest > MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"stop has {len(stops)} strings, the longest of {longest} characters: at most "
                f"{MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters each are allowed"
            )
        return stop

    @model_validator(mode="after")
    def _check(self) -> DiffusionParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream=true")
        if self.top_p is not None and self.top_p < 1:
            raise ValueError("top_p < 1 is not supported by the entropy-bound sampler: omit it or set 1")
        self._grammar = grammar_spec(self.response_format, self.structured_outputs)
        return self

    @property
    def grammar(self) -> GrammarSpec | None:
        """The output's constraint, from `response_format` or `structured_outputs` (at most one)."""
        return self._grammar

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per output token the request asks for; None: no logprobs."""
        return None

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling_params(self, max_tokens: int | None, canvas_length: int, choice: int = 0) -> SamplingParams:
        """The engine's view of this request's knobs (n choices get seeds seed, seed + 1, ...)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            max_denoising_steps=self.max_denoising_steps,
            entropy_bound=self.entropy_bound,
            t_min=self.t_min,
            t_max=self.t_max,
            stability_threshold=self.stability_threshold,
            confidence_threshold=self.confidence_threshold,
            seed=None if self.seed is None else (self.seed + choice) % MAX_SEED,
            pinned_canvas=_pinned(self.pinned_canvas, canvas_length),
            logprobs=self.num_logprobs,
            grammar=self.grammar,
        )


def _pinned(values: list[int | None] | None, canvas_length: int) -> tuple[int, ...] | None:
    """Nulls become `FREE`, and a short list is padded with `FREE` (the engine checks the length and ids)."""
    if values is None:
        return None
    padded = [FREE if v is None else v for v in values] + [FREE] * (canvas_length - len(values))
    return tuple(padded)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(DiffusionParams):
    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = _range("max_tokens")
    """None: the checkpoint's max_new_tokens (one canvas), within the context left."""
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Each output token's log-probability and this many most likely alternatives."""
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported: use pinned_canvas for infilling")
        return self


class ContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "model", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(DiffusionParams):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _range("max_tokens")
    max_completion_tokens: int | None = _range("max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """With logprobs: this many most likely alternatives per output token."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


# -- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens read from the prefix cache instead of computed."""


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    denoise_steps: int = 0
    """Extension: denoise passes spent on this request (all choices)."""
    canvases: int = 0
    """Extension: canvases committed for this request (all choices)."""


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "canvas-serve"
    root: str | None = None
    """The base model's name; an adapter's folder (as vLLM gives it)."""
    parent: str | None = None
    """An adapter's base model (its served name); None for the base itself."""
    max_model_len: int | None = None
    canvas_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter` (vLLM's body)."""

    lora_name: str = Field(max_length=256)
    """The name requests will send as `model`."""
    lora_path: str = Field(max_length=4096)
    """The server-side folder holding PEFT's adapter_config.json and adapter_model.safetensors."""


class UnloadLoRAAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter` (vLLM's body; its `lora_int_id` is accepted and ignored)."""

    lora_name: str = Field(max_length=256)
    lora_int_id: int | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
