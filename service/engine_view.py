"""A JSON snapshot of the engine for the live page and operators: who shares the steps, and how fast.

The requests come from the engine client (`EngineClient.requests()`: summaries the engine core
process ships, or ones read from an in-process scheduler, tolerating the engine thread's changes),
the counters from its `EngineStats`; a snapshot never raises. Rates (committed tok/s, steps per
canvas) are differences between samples taken over the last `window_s` seconds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from engine.snapshot import RequestSummary, safe_copy
from service.metrics import PREFIX, Metrics
from service.serving import Service

__all__ = ["EngineView", "Sample", "request_row", "safe_copy"]  # safe_copy: its old home
WINDOW_S = 5.0


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one instant (the rates are differences of two samples)."""

    time: float
    committed_tokens: int
    denoise_passes: int
    engine_steps: int
    canvases: float
    canvas_steps: float


def request_row(request: RequestSummary, now: float) -> dict[str, Any]:
    """One running or waiting request: its adapter (`lora_name`, None: the base model), where its
    canvas is and how far it has come.

    `step` is the denoise passes of the current canvas: all passes minus those of finished canvases
    (passes lost to a preemption count too, so it may run ahead of the sampler's own step).
    """
    finished_steps = list(request.steps_per_canvas)
    return {
        "id": request.request_id,
        "lora_name": request.lora_name,
        "status": request.status,
        "canvas_index": request.canvas_index,
        "step": max(0, request.denoise_steps - sum(finished_steps)),
        "denoise_steps": request.denoise_steps,
        "steps_per_canvas": finished_steps,
        "prompt_tokens": request.num_prompt_tokens,
        "output_tokens": request.num_output_tokens,
        "max_tokens": request.max_tokens,
        "max_steps": request.max_denoising_steps,
        "streams_canvas": request.want_canvas,
        "num_preemptions": request.num_preemptions,
        "age_s": round(max(0.0, now - request.arrival_time), 3),
    }


class EngineView:
    """Builds engine snapshots; keeps the recent samples that the windowed rates need."""

    def __init__(self, service: Service, metrics: Metrics, window_s: float = WINDOW_S) -> None:
        self.service = service
        self.metrics = metrics
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=4096)

    def snapshot(self) -> dict[str, Any]:
        """The engine now: running and waiting requests, cache use, last step, recent throughput."""
        engine = self.service.engine
        stats = engine.stats
        self.metrics.collect_engine(stats)  # drains per-request records into the histograms
        requests = engine.requests()
        self.metrics.collect_loras(requests)
        now = time.monotonic()
        return {
            "time": time.time(),
            "model": self._model(),
            "alive": engine.is_alive,
            "draining": self.service.draining,
            "running": [request_row(r, now) for r in requests.running],
            "waiting": [request_row(r, now) for r in requests.waiting],
            "num_running": len(requests.running),
            "num_waiting": requests.num_waiting,
            "max_num_seqs": engine.config.max_num_seqs,
            "kv_usage": round(stats.kv_usage, 4),
            "last_step": {
                **asdict(stats.last_step),
                "duration_s": round(stats.last_timing.total_s, 5),
                "request_ids": list(stats.last_step_request_ids),
            },
            "totals": self._totals(stats.finished_by_reason),
            "throughput": self._throughput(self._sample(now)),
        }

    def _model(self) -> dict[str, Any]:
        model = self.service.model
        defaults = self.service.engine.defaults
        return {
            "name": model.name,
            "canvas_length": model.canvas_length,
            "vocab_size": model.vocab_size,
            "max_model_len": model.max_model_len,
            "adapters": self.service.served.adapter_names,
            "defaults": {
                "max_denoising_steps": defaults.max_denoising_steps,
                "entropy_bound": defaults.entropy_bound,
                "t_min": defaults.t_min,
                "t_max": defaults.t_max,
                "stability_threshold": defaults.stability_threshold,
                "confidence_threshold": defaults.confidence_threshold,
                "max_new_tokens": defaults.max_new_tokens,
            },
        }

    def _totals(self, finished_by_reason: dict[str, int]) -> dict[str, Any]:
        stats = self.service.engine.stats
        return {
            "engine_steps": stats.num_steps,
            "denoise_passes": stats.num_denoise_passes,
            "committed_tokens": stats.num_output_tokens,
            "preemptions": stats.num_preemptions,
            "finished": dict(safe_copy(lambda: finished_by_reason.copy().items())),
        }

    def _metric(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(PREFIX + name, {"model_name": self.metrics.model_name})
        return value or 0.0

    def _sample(self, now: float) -> Sample:
        stats = self.service.engine.stats
        sample = Sample(
            now,
            stats.num_output_tokens,
            stats.num_denoise_passes,
            stats.num_steps,
            self._metric("steps_per_canvas_count"),
            self._metric("steps_per_canvas_sum"),
        )
        self._samples.append(sample)
        while len(self._samples) > 2 and now - self._samples[1].time >= self.window_s:
            self._samples.popleft()
        return sample

    def _throughput(self, latest: Sample) -> dict[str, Any]:
        """Rates over the window (None until two samples exist), and steps per canvas since start."""
        oldest = self._samples[0]
        span = latest.time - oldest.time
        canvases = latest.canvases - oldest.canvases

        def rate(value: float) -> float | None:
            return round(value / span, 2) if span > 0 else None

        return {
            "window_s": round(span, 3),
            "committed_tokens_per_s": rate(latest.committed_tokens - oldest.committed_tokens),
            "denoise_passes_per_s": rate(latest.denoise_passes - oldest.denoise_passes),
            "engine_steps_per_s": rate(latest.engine_steps - oldest.engine_steps),
            "steps_per_canvas": (
                round((latest.canvas_steps - oldest.canvas_steps) / canvases, 2) if canvases else None
            ),
            "steps_per_canvas_all_time": (
                round(latest.canvas_steps / latest.canvases, 2) if latest.canvases else None
            ),
        }
