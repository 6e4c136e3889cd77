"""Prefix caching through the HTTP API: `usage.prompt_tokens_details.cached_tokens`, the Prometheus
counters and `POST /reset_prefix_cache`, on the real server with caching on (the default) and off."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import FAST_STEPS, RemoteServer, assert_openai_error

SYSTEM = "You are a terse assistant. Answer in one word. " * 2  # 96 characters: 6 blocks of 16
"""A shared head; the tiny model's tokenizer is char-level (one token per character, plus BOS)."""


def complete(server: RemoteServer, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 16, "max_denoising_steps": FAST_STEPS, "seed": 1}
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def counters(server: RemoteServer) -> dict[str, float]:
    with server.http() as http:
        text = http.get("/metrics").text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("canvas_serve_prefix_cache_")
    }


def test_cached_tokens_metrics_and_reset(server: RemoteServer) -> None:
    before = counters(server)
    first = complete(server, SYSTEM + "Who are you?")
    second = complete(server, SYSTEM + "What is two plus two?")
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"]["cached_tokens"] == 96  # BOS + 96 chars: 6 whole blocks
    after = counters(server)
    hits = after["canvas_serve_prefix_cache_hits_total"] - before["canvas_serve_prefix_cache_hits_total"]
    queries = (
        after["canvas_serve_prefix_cache_queries_total"] - before["canvas_serve_prefix_cache_queries_total"]
    )
    assert hits == 96
    assert queries == first["prompt_tokens"] + second["prompt_tokens"]
    with server.http() as http:
        assert http.post("/reset_prefix_cache").status_code == 200
    third = complete(server, SYSTEM + "Why?")
    assert third["prompt_tokens_details"] == {"cached_tokens": 0}


def test_caching_off_reports_no_cached_tokens_and_refuses_reset(tiny_model_dir: Any) -> None:
    with RemoteServer(tiny_model_dir, "--no-enable-prefix-caching") as server:
        complete(server, SYSTEM + "Who are you?")
        usage = complete(server, SYSTEM + "Who are you?")
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
        with server.http() as http:
            error = assert_openai_error(http.post("/reset_prefix_cache"), 400)
        assert "--no-enable-prefix-caching" in error["message"]
        assert counters(server)["canvas_serve_prefix_cache_queries_total"] == 0
