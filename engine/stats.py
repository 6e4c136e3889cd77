"""Engine statistics for the metrics layer (no torch, no Prometheus: plain numbers).

`EngineStats` holds gauges (refreshed every step), monotonic counters, the last step's composition
and timings, and a bounded queue of per-request records that the metrics layer drains into histograms.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

from engine.request import Request
from engine.scheduler import StepComposition

MAX_PENDING_RECORDS = 10_000
T = TypeVar("T")


@dataclass(frozen=True)
class RequestRecord:
    """Timings and sizes of one finished request."""

    finish_reason: str
    queue_s: float
    """Arrival to first scheduled work (the last admission, after any preemption)."""
    ttft_s: float | None
    """Arrival to the first committed token (None if none was produced)."""
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    denoise_steps: int
    steps_per_canvas: list[int]


@dataclass(frozen=True)
class StepRecord:
    """One engine step, for per-step histograms (batch composition, output tokens, duration)."""

    composition: StepComposition
    output_tokens: int
    """Tokens the step's finished canvases added to request outputs."""
    duration_s: float


@dataclass
class StepTiming:
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.schedule_s + self.execute_s + self.update_s


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_steps: int = 0
    num_denoise_passes: int = 0
    num_output_tokens: int = 0
    """Tokens added to request outputs (what clients receive)."""
    num_prefill_tokens: int = 0
    """Prompt tokens written to the KV cache (recomputation after a preemption included)."""
    num_commit_tokens: int = 0
    """Tokens of committed canvases written to the KV cache by commit passes (see `StepComposition`)."""
    num_cache_tail_tokens: int = 0
    """Tokens of ended requests' last canvases written by cache tail passes (`engine.cache_tail`)."""
    num_preemptions: int = 0
    num_prefix_cache_queries: int = 0
    """Tokens looked up in the prefix cache (each request each time it starts running)."""
    num_prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    last_step: StepComposition = field(default_factory=StepComposition)
    last_step_request_ids: tuple[str, ...] = ()
    """The requests with work in the last step (`SchedulerOutput.request_ids`), not every running one."""
    last_timing: StepTiming = field(default_factory=StepTiming)
    total_timing: StepTiming = field(default_factory=StepTiming)
    """Sums over all steps: scheduling and update are the engine's overhead around the runner."""
    records: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_RECORDS))
    step_records: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_RECORDS))

    def record_step(
        self,
        composition: StepComposition,
        timing: StepTiming,
        output_tokens: int = 0,
        request_ids: tuple[str, ...] = (),
    ) -> None:
        """Count one step: its composition, timing, output tokens and the requests it served."""
        self.num_steps += 1
        self.step_records.append(StepRecord(composition, output_tokens, timing.total_s))
        self.num_denoise_passes += composition.num_denoise_canvases
        self.num_prefill_tokens += composition.num_prefill_tokens
        self.num_commit_tokens += composition.num_commit_tokens
        self.num_cache_tail_tokens += composition.num_tail_tokens
        self.num_preemptions += composition.num_preempted
        self.num_prefix_cache_queries += composition.num_prefix_queries
        self.num_prefix_cache_hits += composition.num_prefix_hits
        self.last_step = composition
        self.last_step_request_ids = request_ids
        self.last_timing = timing
        self.total_timing.schedule_s += timing.schedule_s
        self.total_timing.execute_s += timing.execute_s
        self.total_timing.update_s += timing.update_s

    def record_finished(self, request: Request, now: float) -> None:
        reason = request.finish_reason or "abort"
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        start = request.scheduled_time if request.scheduled_time is not None else now
        ttft = None if request.first_token_time is None else request.first_token_time - request.arrival_time
        self.records.append(
            RequestRecord(
                finish_reason=reason,
                queue_s=start - request.arrival_time,
                ttft_s=ttft,
                e2e_s=now - request.arrival_time,
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=len(request.output_token_ids),
                denoise_steps=request.denoise_steps,
                steps_per_canvas=list(request.steps_per_canvas),
            )
        )

    def drain_records(self) -> list[RequestRecord]:
        """Per-request records since the last drain (for histograms). Safe against the engine thread:
        deque.popleft is atomic, so a record appended meanwhile is kept for the next drain."""
        return _drain(self.records)

    def drain_step_records(self) -> list[StepRecord]:
        return _drain(self.step_records)


def _drain(queue: deque[T]) -> list[T]:
    drained = []
    while queue:
        drained.append(queue.popleft())
    return drained
