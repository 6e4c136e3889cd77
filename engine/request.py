"""Per-request parameters (no torch).

`SamplingParams` holds what a client may set; any field left `None` takes the checkpoint's
`DiffusionDefaults` through `resolve()`, which returns a fully specified copy.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal, TypeVar

from engine.config import DiffusionDefaults

_T = TypeVar("_T")

MIN_TEMPERATURE_SCALE = 1e-3
"""temperature=0 asks for (almost) greedy sampling; the schedule must stay > 0."""

FREE = -1
"""Marks a position of `SamplingParams.pinned_canvas` that the sampler is free to change."""

MAX_LOGPROBS = 20
"""The most alternatives per output token a request may ask for (`SamplingParams.logprobs`)."""

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output, as plain data (the engine compiles it; `engine.guided`).

    `value` by kind: "json_schema" the schema as JSON text; "json_object" unused (""); "regex" a
    regular expression the whole output must match; "choice" a JSON list of the allowed strings;
    "grammar" an EBNF grammar (xgrammar's dialect, rule `root`). Hashable: the compiled grammar is
    cached by it.
    """

    kind: GrammarKind
    value: str = ""


class InvalidParams(ValueError):
    """A client-supplied parameter is out of range; the message says what to change.

    `param` names the offending request field ("prompt", "max_tokens", "t_min", ...) when there is one;
    the server reports it as the OpenAI error's `param`.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Range:
    """The values one numeric request field may take: finite, >= `minimum` (> when `open_minimum`),
    and <= `maximum` when there is one."""

    minimum: float
    maximum: float | None = None
    open_minimum: bool = False

    def check(self, name: str, value: float | None) -> None:
        """Raise `InvalidParams` naming the field unless `value` is None or in range."""
        if value is None:
            return
        if not math.isfinite(value):
            raise InvalidParams(f"{name} must be a finite number, got {value}", name)
        if value < self.minimum or (self.open_minimum and value == self.minimum):
            relation = ">" if self.open_minimum else ">="
            raise InvalidParams(f"{name}={value} must be {relation} {_number(self.minimum)}", name)
        if self.maximum is not None and value > self.maximum:
            raise InvalidParams(f"{name}={value} must be <= {_number(self.maximum)}", name)

    def json_schema(self) -> dict[str, float]:
        """The range in JSON Schema's words, for the API's documentation."""
        bounds = {"exclusiveMinimum" if self.open_minimum else "minimum": self.minimum}
        return bounds if self.maximum is None else {**bounds, "maximum": self.maximum}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


RANGES: dict[str, Range] = {
    "max_tokens": Range(1),
    "temperature": Range(0, maximum=10),
    "max_denoising_steps": Range(1, maximum=1024),
    "entropy_bound": Range(0, open_minimum=True),
    "t_min": Range(0, open_minimum=True),
    "t_max": Range(0, open_minimum=True),
    "stability_threshold": Range(0, maximum=64),
    "confidence_threshold": Range(0, open_minimum=True),
    "logprobs": Range(0, maximum=MAX_LOGPROBS),
}
"""Every numeric `SamplingParams` field's range: checked here once, documented in the API schema."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler.

    `max_tokens` keeps OpenAI's meaning: the output is cut at that many tokens even though the
    model always fills whole canvases. `pinned_canvas` (infilling) is a seed for the first canvas:
    one entry per canvas position, a token id to pin there or `FREE`; pinned tokens are never
    re-noised and always appear in the committed canvas.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    """Scales the whole temperature schedule (t_min and t_max, explicit or default); applied by
    `resolve()`, which returns it as None."""
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    pinned_canvas: tuple[int, ...] | None = None
    logprobs: int | None = None
    """Report each output token's log-probability and this many top alternatives (0-20); None: none."""
    grammar: GrammarSpec | None = None
    """Constrain the output to a grammar: every committed canvas is decoded under its token mask."""

    def __post_init__(self) -> None:
        for name, allowed in RANGES.items():
            allowed.check(name, getattr(self, name))
        if self.t_min is not None and self.t_max is not None and self.t_max < self.t_min:
            raise InvalidParams(
                f"t_max={self.t_max} is below t_min={self.t_min}: make t_max >= t_min", "t_max"
            )

    def resolve(self, defaults: DiffusionDefaults) -> SamplingParams:
        """A copy with every unset field taken from `defaults`."""
        filled = {
            f.name: getattr(defaults, f.name)
            for f in fields(self)
            if getattr(self, f.name) is None and hasattr(defaults, f.name)
        }
        if self.max_tokens is None:
            filled["max_tokens"] = defaults.max_new_tokens
        if self.stop_token_ids is None:
            filled["stop_token_ids"] = defaults.eos_token_ids
        resolved = replace(self, **filled)
        if self.temperature is None:
            return resolved
        scale = max(self.temperature, MIN_TEMPERATURE_SCALE)
        assert resolved.t_min is not None and resolved.t_max is not None
        return replace(resolved, temperature=None, t_min=resolved.t_min * scale, t_max=resolved.t_max * scale)

    def check_canvas(self, canvas_length: int, vocab_size: int) -> None:
        """Raise `InvalidParams` unless `pinned_canvas` fits a canvas of this model."""
        if self.pinned_canvas is None:
            return
        if len(self.pinned_canvas) != canvas_length:
            raise InvalidParams(
                f"pinned_canvas has {len(self.pinned_canvas)} positions; the canvas has {canvas_length}",
                "pinned_canvas",
            )
        bad = [t for t in self.pinned_canvas if t != FREE and not 0 <= t < vocab_size]
        if bad:
            raise InvalidParams(
                f"pinned_canvas token {bad[0]} is outside the vocabulary [0, {vocab_size})", "pinned_canvas"
            )


def check_prompt_ids(prompt_token_ids: list[int], vocab_size: int) -> None:
    """Raise `InvalidParams` (param "prompt") if a prompt token id is outside the vocabulary."""
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParams(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")


@dataclass(frozen=True)
class StepParams:
    """One canvas's sampler parameters (a resolved `SamplingParams`)."""

    max_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float

    @classmethod
    def from_sampling(cls, params: SamplingParams) -> StepParams:
        """Take the sampler fields of a `SamplingParams` that went through `resolve()`."""
        return cls(
            max_steps=_resolved(params.max_denoising_steps, "max_denoising_steps"),
            t_min=_resolved(params.t_min, "t_min"),
            t_max=_resolved(params.t_max, "t_max"),
            entropy_bound=_resolved(params.entropy_bound, "entropy_bound"),
            stability_threshold=_resolved(params.stability_threshold, "stability_threshold"),
            confidence_threshold=_resolved(params.confidence_threshold, "confidence_threshold"),
        )


def _resolved(value: _T | None, name: str) -> _T:
    if value is None:
        raise ValueError(f"SamplingParams.{name} is unset: call SamplingParams.resolve(defaults) first")
    return value


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Request:
    """One request's state in the scheduler (no tensors; the runner keeps those by `request_id`).

    The cache must hold `cache_token_ids` = prompt + every committed canvas, in order. Positions
    [0, num_computed_tokens) are in the cache; the rest are causal work still to schedule (a prompt
    not yet prefilled, a canvas waiting for its commit, or everything after a preemption). Once they
    are all in, the request denoises its canvas number `canvas_index` at positions [num_computed_tokens, +C).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """Resolved: every field set."""
    seed: int
    arrival_time: float
    want_canvas: bool = False
    status: RequestStatus = RequestStatus.WAITING
    committed_token_ids: list[int] = field(default_factory=list)
    """Every token of every committed canvas (the cache's content after the prompt)."""
    output_token_ids: list[int] = field(default_factory=list)
    """What the client receives: committed canvases cut at the first stop id and at max_tokens."""
    num_computed_tokens: int = 0
    canvas_index: int = 0
    canvas_started: bool = False
    denoise_steps: int = 0
    """Denoise steps over the whole request (preempted work counts again)."""
    steps_per_canvas: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    scheduled_time: float | None = None
    """When the request was last admitted to run (monotonic clock)."""
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache at the first admission (None before it)."""
    cache_key: str | None = None
    """What else than token ids decides this request's K/V (an adapter id; None: the base model).
    Requests with different keys never share cached blocks."""
    lora_name: str | None = None
    """The adapter this request runs with (None: the base model)."""
    lora_id: int | None = None
    """That adapter's per-load id: what the scheduler's `max_loras` rule and the runner's slots key on."""
    num_lora_passes: int = 0
    """Times a later request started while the `max_loras` rule held this one back (bounded)."""

    @property
    def cache_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.committed_token_ids

    @property
    def num_pending_causal(self) -> int:
        """Tokens that must be written into the cache before the next denoise step."""
        return len(self.prompt_token_ids) + len(self.committed_token_ids) - self.num_computed_tokens


@dataclass(frozen=True)
class CanvasSnapshot:
    """A live view of a canvas after one denoise step (for streaming)."""

    canvas_index: int
    step: int
    token_ids: list[int]
    confidence: list[float]
    num_accepted: int
    mean_entropy: float
    pinned: list[int] = field(default_factory=list)
    """Pinned positions, ascending: never re-noised (`pinned_canvas`, a grammar's skeleton)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    denoise_steps: int
    canvases: int
    steps_per_canvas: tuple[int, ...] = ()
    cached_tokens: int = 0
    """Prompt tokens read from the prefix cache instead of computed (OpenAI's
    `usage.prompt_tokens_details.cached_tokens`)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability and its top alternatives (most likely first), plain data.

    The distribution is the one the token was committed from: the temperature-1 softmax of the
    soft-capped logits at its position in the canvas's final denoise step, restricted to the tokens
    the request's grammar allowed there (all tokens without a grammar), see `engine.logprobs`.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) pairs, sorted by log-probability, descending."""


@dataclass(frozen=True)
class RequestOutput:
    """One event of a request's stream: new committed tokens, a canvas snapshot, or its end.

    `new_text` is filled by the engine's detokenizer (empty from the scheduler). `usage` comes with
    every event that commits a canvas (the usage so far: a client that stops the request there, at a
    stop string, reports it) and with the finishing event.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    canvas: CanvasSnapshot | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """One entry per `new_token_ids` entry, when the request asked for logprobs."""
    lora_name: str | None = None
    """The adapter the request runs with (None: the base model), for per-adapter metrics."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
