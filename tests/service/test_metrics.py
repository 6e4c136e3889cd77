"""Metrics from a hand-built EngineStats (no model), read back through the Prometheus text parser."""

from __future__ import annotations

import re
import time

from prometheus_client.parser import text_string_to_metric_families

from engine.request import Usage
from engine.scheduler import StepComposition
from engine.snapshot import RequestSummary, RequestsView
from engine.stats import EngineStats, RequestRecord, StepTiming
from service.metrics import Metrics, build_1_2_5_buckets

MODEL = "tiny"
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": MODEL, **labels}.items()))]


def record(
    reason: str = "stop", ttft_s: float | None = 0.05, canvases: tuple[int, ...] = (8, 4)
) -> RequestRecord:
    return RequestRecord(
        finish_reason=reason,
        queue_s=0.01,
        ttft_s=ttft_s,
        e2e_s=0.9,
        prompt_tokens=12,
        completion_tokens=64,
        denoise_steps=sum(canvases),
        steps_per_canvas=list(canvases),
    )


def test_gauges_and_vllm_aliases() -> None:
    metrics, stats = Metrics(MODEL), EngineStats(num_running=3, num_waiting=7, kv_usage=0.25)
    metrics.collect_engine(stats)
    samples = scrape(metrics)
    for name, expected in [
        ("num_requests_running", 3),
        ("num_requests_waiting", 7),
        ("kv_cache_usage_perc", 0.25),
    ]:
        assert value(samples, f"canvas_serve_{name}") == expected
        assert value(samples, f"vllm:{name}") == expected
    assert value(samples, "vllm:gpu_cache_usage_perc") == 0.25


def test_counters_advance_by_delta_only() -> None:
    metrics, stats = Metrics(MODEL), EngineStats()
    stats.num_steps, stats.num_output_tokens, stats.num_prefill_tokens = 3, 40, 100
    stats.finished_by_reason = {"stop": 2}
    metrics.collect_engine(stats)
    metrics.collect_engine(stats)  # nothing new: nothing added
    stats.num_steps, stats.num_output_tokens = 5, 50
    stats.finished_by_reason = {"stop": 3, "length": 1}
    metrics.collect_engine(stats)
    samples = scrape(metrics)
    assert value(samples, "canvas_serve_engine_steps_total") == 5
    assert value(samples, "canvas_serve_generation_tokens_total") == 50
    assert value(samples, "canvas_serve_prompt_tokens_total") == 100
    assert value(samples, "canvas_serve_num_preemptions_total") == 0
    assert value(samples, "canvas_serve_request_success_total", finished_reason="stop") == 3
    assert value(samples, "canvas_serve_request_success_total", finished_reason="length") == 1
    assert value(samples, "canvas_serve_request_success_total", finished_reason="abort") == 0  # pre-created


def test_fresh_stats_count_from_zero() -> None:
    metrics = Metrics(MODEL)
    metrics.collect_engine(EngineStats(num_steps=10))
    metrics.collect_engine(EngineStats(num_steps=4))  # engine restarted: its 4 steps are new
    assert value(scrape(metrics), "canvas_serve_engine_steps_total") == 14


def test_request_records_observed_once() -> None:
    metrics, stats = Metrics(MODEL), EngineStats()
    stats.records.extend([record(), record("length", ttft_s=None, canvases=(16,))])
    metrics.collect_engine(stats)
    metrics.collect_engine(stats)
    samples = scrape(metrics)
    assert value(samples, "canvas_serve_time_to_first_token_seconds_count") == 1  # None is not observed
    assert value(samples, "canvas_serve_time_to_first_token_seconds_bucket", le="0.06") == 1
    assert value(samples, "canvas_serve_e2e_request_latency_seconds_count") == 2
    assert value(samples, "canvas_serve_request_queue_time_seconds_sum") == 0.02
    assert value(samples, "canvas_serve_request_prompt_tokens_sum") == 24
    assert value(samples, "canvas_serve_request_generation_tokens_sum") == 128
    assert value(samples, "canvas_serve_request_denoise_steps_sum") == 28
    assert value(samples, "canvas_serve_steps_per_canvas_count") == 3  # one observation per canvas
    assert value(samples, "canvas_serve_steps_per_canvas_bucket", le="4.0") == 1
    assert value(samples, "canvas_serve_canvases_committed_total") == 3


def test_step_records_give_composition_and_tokens_per_pass() -> None:
    metrics, stats = Metrics(MODEL), EngineStats()
    stats.record_step(StepComposition(num_prefill_tokens=100), StepTiming(execute_s=0.02))
    stats.record_step(
        StepComposition(num_commit_tokens=32, num_denoise_canvases=4), StepTiming(0.001, 0.004), 8
    )
    metrics.collect_engine(stats)
    metrics.collect_engine(stats)
    samples = scrape(metrics)
    # Only the step with denoise work counts: 8 committed tokens over 4 canvases.
    assert value(samples, "canvas_serve_tokens_per_denoise_step_count") == 1
    assert value(samples, "canvas_serve_tokens_per_denoise_step_sum") == 2.0
    assert value(samples, "canvas_serve_iteration_prefill_tokens_count") == 2
    assert value(samples, "canvas_serve_iteration_prefill_tokens_bucket", le="0.0") == 1
    assert value(samples, "canvas_serve_iteration_prefill_tokens_sum") == 100
    assert value(samples, "canvas_serve_iteration_commit_tokens_sum") == 32
    assert value(samples, "canvas_serve_iteration_denoise_canvases_sum") == 4
    assert value(samples, "canvas_serve_iteration_duration_seconds_count") == 2
    assert value(samples, "canvas_serve_denoise_steps_total") == 4
    assert value(samples, "canvas_serve_commit_pass_tokens_total") == 32


def test_http_and_rejections() -> None:
    metrics = Metrics(MODEL)
    metrics.observe_http("POST", "/v1/completions", 200)
    metrics.observe_http("POST", "/v1/completions", 200)
    metrics.observe_http("POST", "/v1/completions", 503)
    metrics.observe_rejected("queue_full")
    samples = scrape(metrics)
    http = {"method": "POST", "route": "/v1/completions"}
    assert value(samples, "canvas_serve_http_responses_total", status="200", **http) == 2
    assert value(samples, "canvas_serve_http_responses_total", status="503", **http) == 1
    assert value(samples, "canvas_serve_requests_rejected_total", reason="queue_full") == 1
    assert value(samples, "canvas_serve_requests_rejected_total", reason="draining") == 0


def test_names_are_valid_unique_and_registries_independent() -> None:
    first, second = Metrics(MODEL), Metrics(MODEL)  # a second app must not clash with the first
    second.observe_rejected("invalid")
    body, content_type = first.render()
    assert content_type.startswith("text/plain")
    names = [family.name for family in first.registry.collect()]
    assert len(names) == len(set(names))
    assert all(NAME_RE.match(name) for name in names)
    assert [name for name in names if ":" in name] == [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ]
    assert all(name.startswith(("canvas_serve_", "vllm:")) for name in names)
    parsed = list(text_string_to_metric_families(body.decode()))
    extra = {family.name for family in parsed} - set(names)  # the text parser splits off _created
    assert {family.name for family in parsed} >= set(names)
    assert all(name.endswith("_created") for name in extra)
    assert all(s.labels.get("model_name") == MODEL for family in parsed for s in family.samples)
    assert value(scrape(first), "canvas_serve_requests_rejected_total", reason="invalid") == 0


def test_1_2_5_buckets() -> None:
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(8192)[-1] == 5000


def summary(request_id: str, lora_name: str | None) -> RequestSummary:
    return RequestSummary(
        request_id=request_id,
        status="running",
        canvas_index=0,
        denoise_steps=0,
        steps_per_canvas=(),
        num_prompt_tokens=3,
        num_output_tokens=0,
        max_tokens=None,
        max_denoising_steps=None,
        want_canvas=False,
        num_preemptions=0,
        arrival_time=0.0,
        lora_name=lora_name,
    )


def test_lora_metrics_only_with_lora_and_vllms_info_gauge_has_vllms_labels() -> None:
    assert not any("lora" in family.name for family in Metrics(MODEL).registry.collect())
    metrics = Metrics(MODEL, max_loras=2)
    running = [summary("r0", "a"), summary("r1", None), summary("r2", "b"), summary("r3", "a")]
    metrics.collect_loras(RequestsView(running, [summary("w0", "c")], 1))
    metrics.collect_loras(RequestsView(running[:2], [], 0))  # the latest state only: one series
    samples = scrape(metrics)
    info = [(name, dict(labels)) for name, labels in samples if name.endswith("lora_requests_info")]
    latest = {"max_lora": "2", "running_lora_adapters": "a", "waiting_lora_adapters": ""}
    assert sorted(info, key=lambda item: item[0]) == [
        ("canvas_serve_lora_requests_info", {"model_name": MODEL, **latest}),
        ("vllm:lora_requests_info", latest),
    ]
    assert abs(samples[("vllm:lora_requests_info", frozenset(latest.items()))] - time.time()) < 60


def test_each_adapters_choices_and_tokens_are_counted_under_lora_name() -> None:
    metrics = Metrics(MODEL, max_loras=1)
    usage = Usage(prompt_tokens=5, completion_tokens=16, denoise_steps=4, canvases=1)
    metrics.observe_lora_choice("a", "length", usage)
    metrics.observe_lora_choice("a", "stop", usage)
    metrics.observe_lora_choice("a", "abort", None)  # gone before any usage came
    metrics.observe_lora_choice("b", "stop", usage)
    samples = scrape(metrics)
    for reason, count in (("length", 1), ("stop", 1), ("abort", 1)):
        assert (
            value(samples, "canvas_serve_lora_request_success_total", lora_name="a", finished_reason=reason)
            == count
        )
    assert value(samples, "canvas_serve_lora_prompt_tokens_total", lora_name="a") == 10
    assert value(samples, "canvas_serve_lora_generation_tokens_total", lora_name="a") == 32
    assert value(samples, "canvas_serve_lora_generation_tokens_total", lora_name="b") == 16
