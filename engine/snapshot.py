"""What the API side may know of a running engine: statistics and the requests it holds (no torch).

An engine in another process cannot be read directly, so it ships `EngineSnapshot`s: its
`EngineStats` (each per-request and per-step record once: the copy takes what the engine had queued)
and a summary of its running and waiting requests. The API side merges them into a mirror
`EngineStats` that the metrics layer reads as it reads a live one. The in-process engine builds the
same summaries straight from its scheduler.

`take_stats` and `merge_stats` treat `EngineStats` field by field (a deque field is a queue of
records; anything else is a value to overwrite), so a counter or record queue added to `EngineStats`
travels without a change here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from engine.request import Request
from engine.stats import EngineStats

T = TypeVar("T")
MAX_WAITING_ROWS = 32
"""Waiting requests summarised at most (the count is always whole)."""


@dataclass(frozen=True)
class RequestSummary:
    """One running or waiting request, as the engine view shows it."""

    request_id: str
    status: str
    """"waiting", "running" or "preempted"."""
    canvas_index: int
    denoise_steps: int
    """Denoise steps over the whole request (preempted work counts again)."""
    steps_per_canvas: tuple[int, ...]
    """Denoise steps of each committed canvas."""
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int | None
    max_denoising_steps: int | None
    want_canvas: bool
    num_preemptions: int
    arrival_time: float
    """`time.monotonic()` at arrival: one clock for every process of the host."""
    lora_name: str | None = None
    """The adapter the request runs with (None: the base model)."""

    @classmethod
    def of(cls, request: Request) -> RequestSummary:
        return cls(
            request_id=request.request_id,
            status=request.status.name.lower(),
            canvas_index=request.canvas_index,
            denoise_steps=request.denoise_steps,
            steps_per_canvas=tuple(request.steps_per_canvas),
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
            max_tokens=request.params.max_tokens,
            max_denoising_steps=request.params.max_denoising_steps,
            want_canvas=request.want_canvas,
            num_preemptions=request.num_preemptions,
            arrival_time=request.arrival_time,
            lora_name=request.lora_name,
        )


@dataclass(frozen=True)
class RequestsView:
    """The engine's requests at one instant: every running one, the first `MAX_WAITING_ROWS` waiting."""

    running: list[RequestSummary] = field(default_factory=list)
    waiting: list[RequestSummary] = field(default_factory=list)
    num_waiting: int = 0

    @classmethod
    def of(cls, running: Iterable[Request], waiting: Iterable[Request]) -> RequestsView:
        waiting_list = list(waiting)
        return cls(
            [RequestSummary.of(r) for r in running],
            [RequestSummary.of(r) for r in waiting_list[:MAX_WAITING_ROWS]],
            len(waiting_list),
        )


@dataclass(frozen=True)
class EngineSnapshot:
    """Shipped by an engine core process: its statistics and, now and then, its requests."""

    stats: EngineStats
    requests: RequestsView | None = None
    """None when unchanged enough to skip (the rows cost more than the counters)."""


def safe_copy(items: Callable[[], Iterable[T]], attempts: int = 3) -> list[T]:
    """`list(items())`, retried if another thread changed the container meanwhile; [] at worst."""
    for _ in range(attempts):
        try:
            return list(items())
        except RuntimeError:  # "deque mutated during iteration" and the like
            continue
    return []


def take_stats(stats: EngineStats) -> EngineStats:
    """A copy of `stats` to ship, holding the records queued since the last take (now gone from
    `stats`, so each record ships once). Other fields are shared, not copied: encode it at once."""
    values: dict[str, Any] = {f.name: getattr(stats, f.name) for f in fields(stats)}
    queued: dict[str, Any] = {k: deque(_drain(v)) for k, v in values.items() if isinstance(v, deque)}
    return replace(stats, **queued)


def merge_stats(mirror: EngineStats, shipped: EngineStats) -> None:
    """Bring `mirror` up to `shipped`: queue its records behind the mirror's, take every other value."""
    for f in fields(shipped):
        value = getattr(shipped, f.name)
        if isinstance(value, deque):
            getattr(mirror, f.name).extend(value)
        else:
            setattr(mirror, f.name, value)


def _drain(queue: deque[T]) -> list[T]:
    drained = []
    while queue:
        drained.append(queue.popleft())
    return drained
