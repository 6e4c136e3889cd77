"""Schemathesis against our own OpenAPI schema (`/openapi.json`): no generated request gets a 5xx.

The server is sized so that any valid request is cheap: a 64-token context (at most 4 canvases),
2 denoising steps by default, n and prompt lists capped through the environment. Only
`max_denoising_steps` has no server-side cap below 1,024, so the test clamps it in each case. A 200
event stream must end with `[DONE]` and carry no in-band error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.service.adapters import save_adapter
from tests.service.conftest import RemoteServer

Case = schemathesis.Case[Any]
MAX_STEPS = 2
MAX_EXAMPLES = 100
ENDLESS = {"GET /v1/engine/events"}
"""Event streams that run for many seconds by design: nothing to learn from fuzzing them."""


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """With LoRA on, an adapter loaded and run-time loading open, so the adapter routes are fuzzed too."""
    adapter = save_adapter(tiny_model_dir, tmp_path_factory.mktemp("fuzz-adapter") / "fz", seed=5)
    flags = ["--max-model-len", "64", "--diffusion-config", json.dumps({"max_denoising_steps": MAX_STEPS})]
    flags += ["--enable-lora", "--lora-modules", f"fz={adapter}", "--allow-runtime-lora-updating"]
    env = {"CANVAS_SERVE_MAX_N": "2", "CANVAS_SERVE_MAX_PROMPTS_PER_REQUEST": "3"}
    with RemoteServer(tiny_model_dir, *flags, "--max-waiting", "64", env=env) as remote:
        yield remote


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RemoteServer) -> OpenApiSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def prepare(case: Case, model: str, repair: bool) -> Case:
    """Clamp max_denoising_steps; with `repair`, also fix what the schema cannot express but the
    server rightly refuses (tested in test_http_api.py), so more valid requests, streams included,
    reach the engine."""
    body = case.body
    if not isinstance(body, dict):
        return case
    steps = body.get("max_denoising_steps")
    if isinstance(steps, int):
        body["max_denoising_steps"] = min(steps, MAX_STEPS)
    if not repair:
        return case
    for unsupported in ("suffix", "structured_outputs", "response_format"):
        body.pop(unsupported, None)
    if "model" in body:
        body["model"] = model
    if isinstance(body.get("top_p"), float | int):
        body["top_p"] = 1.0
    if body.get("stream_options") is not None:
        body["stream"] = True
    t_min, t_max = body.get("t_min"), body.get("t_max")
    if isinstance(t_min, float | int) and isinstance(t_max, float | int) and t_max < t_min:
        body["t_min"], body["t_max"] = t_max, t_min
    return case


def assert_clean_stream(body: str, complete: bool) -> None:
    """A 200 stream cannot change its status: an internal error would show only in band."""
    assert body.endswith("data: [DONE]\n\n") or not complete, body[-500:]
    for line in body.splitlines():
        if line.startswith("data: {"):
            assert "error" not in json.loads(line.removeprefix("data: ")), line


def operations(api_schema: OpenApiSchema) -> list[APIOperation[Any, Any, Any, Any]]:
    """Every operation; `ok()` raises if part of the schema is invalid."""
    return [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]


def test_the_schema_has_our_routes(api_schema: OpenApiSchema) -> None:
    labels = [operation.label for operation in operations(api_schema)]
    for label in ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /ready"]:
        assert label in labels
    assert {"POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"} <= set(labels)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_generated_request_gets_a_server_error(
    api_schema: OpenApiSchema, fuzz_server: RemoteServer, mode: GenerationMode
) -> None:
    """Hypothesis drives each operation, valid inputs and invalid ones (the lazy `from_fixture` loader
    does not run under pytest 9, so operations are iterated here, not parametrized at collection)."""
    for operation in operations(api_schema):
        has_body = bool(operation.get_request_payload_content_types())  # POST /reset_prefix_cache has none
        if operation.label in ENDLESS or (mode is GenerationMode.NEGATIVE and not has_body):
            continue
        examples = MAX_EXAMPLES if has_body else 3

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: Case) -> None:
            prepare(case, fuzz_server.model_name, repair=mode is GenerationMode.POSITIVE)
            response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
            if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                assert_clean_stream(response.content.decode(), complete=not response.stream_cut_short)

        check()
