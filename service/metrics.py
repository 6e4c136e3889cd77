"""Every Prometheus metric of the server, defined once, in its own registry.

Names mirror vLLM's (`vllm/v1/metrics/loggers.py`) with the prefix `canvas_serve_` in place of `vllm:`,
so its dashboards port by a rename; diffusion adds denoise steps, canvases, steps per canvas, tokens
committed per denoise pass and the batch composition of each step. Every metric carries `model_name`.

The gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and
its deprecated name `vllm:gpu_cache_usage_perc` are exported too, with the same values, because the
production-stack router, KEDA's default trigger and the Gateway API Inference Extension read those
exact names. prometheus_client accepts colons in names; Prometheus reserves them for recording rules,
so `promtool check metrics` warns about these four, the only names here with a colon.

LoRA (with `max_loras` given): vLLM's `vllm:lora_requests_info` gauge under its name and labels
(`max_lora`, and the comma-separated adapters of the running and of the waiting requests, its value the
time of the last update), the gateway's and routers' signal of which adapters a replica has busy, and the
same as `canvas_serve_lora_requests_info` with `model_name`. vLLM counts an adapter's requests and
tokens under the base model's `model_name` only; those totals stay as they are here too, and
`canvas_serve_lora_request_success`, `canvas_serve_lora_prompt_tokens` and
`canvas_serve_lora_generation_tokens` split them per adapter with the label `lora_name` (the name of
vLLM's `LoRARequest` and of its load/unload API), counted as each request's choices end.

The registry is per `Metrics` object, not prometheus_client's global one, so tests can build several
apps. prometheus_client exposes counters with `_total` (and `_created`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.request import FinishReason, Usage
from engine.snapshot import RequestsView
from engine.stats import EngineStats, RequestRecord, StepRecord

PREFIX = "canvas_serve_"
GAUGES = {
    # name: (EngineStats attribute, help)
    "num_requests_running": ("num_running", "Requests in the running batch."),
    "num_requests_waiting": ("num_waiting", "Requests waiting to be scheduled."),
    "kv_cache_usage_perc": ("kv_usage", "Fraction of KV cache blocks in use (0-1)."),
}
VLLM_ALIASES = {
    # vLLM name: our name
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage_perc",  # deprecated in vLLM, still read by routers
}
REJECT_REASONS = ("invalid", "queue_full", "draining", "engine_dead")
"""The `reason` label of requests_rejected, every value it takes: why a generation request was refused
before the engine. See `rejection_reason`."""

# vLLM's buckets (serving.md §2.1).
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
LATENCY_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0),
    *(120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
STEP_DURATION_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 10.0),
)
STEPS_PER_CANVAS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# Most passes commit nothing (a canvas commits only on its last step), so 0 and fractions get buckets.
TOKENS_PER_PASS_BUCKETS = (0, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
DENOISE_CANVAS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

ENGINE_COUNTERS = {
    # EngineStats attribute: (metric name, help)
    "num_steps": ("engine_steps", "Engine steps run."),
    "num_denoise_passes": ("denoise_steps", "Denoise passes run, one per canvas per step."),
    "num_prefill_tokens": ("prompt_tokens", "Prefill tokens processed (recomputation included)."),
    "num_output_tokens": ("generation_tokens", "Tokens committed to request outputs."),
    "num_commit_tokens": ("commit_pass_tokens", "Tokens written to the KV cache by commit passes."),
    "num_cache_tail_tokens": (
        "cache_tail_tokens",
        "Tokens of ended requests' last canvases written to the KV cache for the prefix cache.",
    ),
    "num_preemptions": ("num_preemptions", "Requests preempted."),
    "num_prefix_cache_queries": (
        "prefix_cache_queries",
        "Prefix cache queries, in tokens looked up (each request each time it starts running).",
    ),
    "num_prefix_cache_hits": ("prefix_cache_hits", "Prefix cache hits, in tokens found cached."),
}


def rejection_reason(status: int, code: str | None) -> str | None:
    """The REJECT_REASONS entry of a generation request answered with an error, None if the error is no
    refusal (a 500 is the server's fault). The error's code names the reason for a full queue (429),
    a draining server and a dead engine (503); any other 4xx is a request to fix: "invalid"."""
    if code in REJECT_REASONS:
        return code
    if 400 <= status < 500 and status != 429:
        return "invalid"
    return None


def _adapters(names: Iterable[str | None]) -> str:
    """The distinct adapter names, comma-separated in first-seen order (vLLM's label value)."""
    return ",".join(dict.fromkeys(name for name in names if name is not None))


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including the last one <= max_value (vLLM's helper)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class Metrics:
    """The server's metrics in one `CollectorRegistry`; `render()` is the body of `GET /metrics`.

    Engine numbers are pulled, not pushed: `collect_engine(stats)` runs right before each render (and
    may also run periodically) on the event-loop thread while the engine thread mutates `stats`.
    """

    def __init__(self, model_name: str, max_model_len: int = 65536, max_loras: int | None = None) -> None:
        """`max_loras`: the server's --max-loras when it serves LoRA adapters (None: the LoRA metrics
        are left out, as vLLM leaves them out without --enable-lora)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.max_loras = max_loras
        self._last: dict[str, int] = {}
        self._define_gauges()
        self._define_engine_alive()
        self._define_counters()
        self._define_request_histograms(build_1_2_5_buckets(max_model_len))
        self._define_step_histograms(build_1_2_5_buckets(65536))
        if max_loras is not None:
            self._define_lora()

    # -- definitions -------------------------------------------------------------------------------

    def _define_gauges(self) -> None:
        self.gauges: list[tuple[Gauge, str]] = [
            (self._gauge(PREFIX + name, help_text), attr) for name, (attr, help_text) in GAUGES.items()
        ]
        for alias, name in VLLM_ALIASES.items():
            self.gauges.append(
                (self._gauge(alias, f"Alias of {PREFIX}{name} under vLLM's name."), GAUGES[name][0])
            )

    def _define_engine_alive(self) -> None:
        self.engine_alive = self._gauge(
            PREFIX + "engine_alive",
            "1 while the engine (its process, or its thread) runs; 0 once it has died or stopped.",
        )

    def _define_counters(self) -> None:
        self.engine_counters = {
            attr: self._counter(name, help_text) for attr, (name, help_text) in ENGINE_COUNTERS.items()
        }
        self.canvases = self._counter("canvases_committed", "Canvases committed, counted at request end.")
        labels = ["model_name", "finished_reason"]
        self.request_success = Counter(
            f"{PREFIX}request_success", "Finished requests by reason.", labels, registry=self.registry
        )
        for reason in get_args(FinishReason):  # present from the start, so rate() sees the first one
            self.request_success.labels(self.model_name, reason)
        labels = ["model_name", "method", "route", "status"]
        self.http_responses = Counter(
            f"{PREFIX}http_responses", "HTTP responses by route and status.", labels, registry=self.registry
        )
        labels = ["model_name", "reason"]
        self.rejected = Counter(
            f"{PREFIX}requests_rejected",
            "Requests refused before the engine.",
            labels,
            registry=self.registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(self.model_name, reason)

    def _define_request_histograms(self, token_buckets: list[int]) -> None:
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Arrival to first committed token.", TTFT_BUCKETS
        )
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = self._histogram(
            "request_queue_time_seconds", "Arrival to first scheduled work.", LATENCY_BUCKETS
        )
        self.prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens.", token_buckets)
        self.generation_tokens = self._histogram(
            "request_generation_tokens", "Completion tokens.", token_buckets
        )
        self.request_denoise_steps = self._histogram(
            "request_denoise_steps", "Denoise steps per request.", token_buckets
        )
        self.steps_per_canvas = self._histogram(
            "steps_per_canvas", "Denoise steps per committed canvas.", STEPS_PER_CANVAS_BUCKETS
        )

    def _define_step_histograms(self, token_buckets: list[int]) -> None:
        zero_first = [0, *token_buckets]  # le="0" counts the steps without that kind of work
        self.tokens_per_pass = self._histogram(
            "tokens_per_denoise_step",
            "Tokens committed per denoise pass, per step with denoise work.",
            TOKENS_PER_PASS_BUCKETS,
        )
        self.step_prefill = self._histogram(
            "iteration_prefill_tokens", "Prefill tokens per engine step.", zero_first
        )
        self.step_commit = self._histogram(
            "iteration_commit_tokens", "Commit-pass tokens per engine step.", zero_first
        )
        self.step_canvases = self._histogram(
            "iteration_denoise_canvases", "Canvases denoised per engine step.", DENOISE_CANVAS_BUCKETS
        )
        self.step_duration = self._histogram(
            "iteration_duration_seconds", "Engine step wall time.", STEP_DURATION_BUCKETS
        )

    def _define_lora(self) -> None:
        info_labels = ["max_lora", "waiting_lora_adapters", "running_lora_adapters"]
        info_help = "Running stats on lora requests: adapters of the running and the waiting requests."
        self.lora_info = [
            Gauge(
                "vllm:lora_requests_info", info_help + " (vLLM's name)", info_labels, registry=self.registry
            ),
            Gauge(
                PREFIX + "lora_requests_info", info_help, ["model_name", *info_labels], registry=self.registry
            ),
        ]
        self.lora_request_success = Counter(
            PREFIX + "lora_request_success",
            "Finished requests (choices) of each LoRA adapter by reason.",
            ["model_name", "lora_name", "finished_reason"],
            registry=self.registry,
        )
        labels = ["model_name", "lora_name"]
        self.lora_prompt_tokens = Counter(
            PREFIX + "lora_prompt_tokens",
            "Prompt tokens of each LoRA adapter's requests.",
            labels,
            registry=self.registry,
        )
        self.lora_generation_tokens = Counter(
            PREFIX + "lora_generation_tokens",
            "Tokens generated by each LoRA adapter's requests.",
            labels,
            registry=self.registry,
        )

    def _gauge(self, name: str, help_text: str) -> Gauge:
        return Gauge(name, help_text, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, help_text: str) -> Counter:
        return Counter(PREFIX + name, help_text, ["model_name"], registry=self.registry).labels(
            self.model_name
        )

    def _histogram(self, name: str, help_text: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
        metric = Histogram(PREFIX + name, help_text, ["model_name"], registry=self.registry, buckets=buckets)
        return metric.labels(self.model_name)

    # -- updates -----------------------------------------------------------------------------------

    def collect_engine(self, stats: EngineStats) -> None:
        """Bring the metrics up to date with `stats`.

        Each drained record is observed exactly once. Counters advance by the difference since the last
        call; a smaller value than last time means a fresh `EngineStats`, all of whose count is new.
        Thread-safe against the engine: ints are read whole, the deques drain by popleft, and the
        reason dict is copied before iterating.
        """
        self._set_gauges(stats)
        for attr, counter in self.engine_counters.items():
            self._advance(attr, getattr(stats, attr), counter)
        for reason, count in stats.finished_by_reason.copy().items():
            self._advance(f"finished:{reason}", count, self.request_success.labels(self.model_name, reason))
        for record in stats.drain_records():
            self._observe_request(record)
        for step in stats.drain_step_records():
            self._observe_step(step)

    def set_engine_alive(self, alive: bool) -> None:
        self.engine_alive.set(1 if alive else 0)

    def observe_http(self, method: str, route: str, status: int) -> None:
        """Count one response; `route` is the route template (`/v1/completions`), never a raw path."""
        self.http_responses.labels(self.model_name, method, route, str(status)).inc()

    def observe_rejected(self, reason: str) -> None:
        """Count a generation request refused before the engine; `reason` is one of REJECT_REASONS."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"rejection reason {reason!r} is not one of {REJECT_REASONS}")
        self.rejected.labels(self.model_name, reason).inc()

    def collect_loras(self, requests: RequestsView) -> None:
        """Set the LoRA info gauges from the engine's requests now (a no-op without LoRA metrics): one
        series each, labelled with the adapters in use, its value the time of this update (vLLM's)."""
        if self.max_loras is None:
            return
        running = _adapters(summary.lora_name for summary in requests.running)
        waiting = _adapters(summary.lora_name for summary in requests.waiting)
        labels = {"max_lora": str(self.max_loras), "waiting_lora_adapters": waiting}
        labels["running_lora_adapters"] = running
        vllm_gauge, gauge = self.lora_info
        for metric, extra in ((vllm_gauge, {}), (gauge, {"model_name": self.model_name})):
            metric.clear()
            metric.labels(**extra, **labels).set_to_current_time()

    def observe_lora_choice(self, lora_name: str, finish_reason: str, usage: Usage | None) -> None:
        """Count one ended choice (engine request) of adapter `lora_name`: its reason and tokens."""
        if self.max_loras is None:
            return
        self.lora_request_success.labels(self.model_name, lora_name, finish_reason).inc()
        if usage is not None:
            self.lora_prompt_tokens.labels(self.model_name, lora_name).inc(usage.prompt_tokens)
            self.lora_generation_tokens.labels(self.model_name, lora_name).inc(usage.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _set_gauges(self, stats: EngineStats) -> None:
        for gauge, attr in self.gauges:
            gauge.set(getattr(stats, attr))

    def _advance(self, key: str, value: int, counter: Counter) -> None:
        last = self._last.get(key, 0)
        delta = value - last if value >= last else value
        if delta:
            counter.inc(delta)
        self._last[key] = value

    def _observe_request(self, record: RequestRecord) -> None:
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
        self.e2e.observe(record.e2e_s)
        self.queue.observe(record.queue_s)
        self.prompt_tokens.observe(record.prompt_tokens)
        self.generation_tokens.observe(record.completion_tokens)
        self.request_denoise_steps.observe(record.denoise_steps)
        for steps in record.steps_per_canvas:
            self.steps_per_canvas.observe(steps)
        if record.steps_per_canvas:
            self.canvases.inc(len(record.steps_per_canvas))

    def _observe_step(self, step: StepRecord) -> None:
        composition = step.composition
        if composition.num_denoise_canvases:
            self.tokens_per_pass.observe(step.output_tokens / composition.num_denoise_canvases)
        self.step_prefill.observe(composition.num_prefill_tokens)
        self.step_commit.observe(composition.num_commit_tokens)
        self.step_canvases.observe(composition.num_denoise_canvases)
        self.step_duration.observe(step.duration_s)
