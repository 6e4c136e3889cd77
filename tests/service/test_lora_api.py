"""LoRA adapters through the HTTP API, on the real server with adapters made by peft: the official
`openai` client picking adapters by `model`, /v1/models, run-time load and unload (also under traffic,
losing no request), vLLM's statuses and messages, the engine view and the per-adapter metrics."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.model_setup import build_service
from service.protocol import CompletionRequest
from service.settings import LoRAModule, Settings
from tests.server_process import REPO, free_port, serve_command
from tests.service.adapters import save_adapter
from tests.service.conftest import FAST_STEPS, RemoteServer, assert_openai_error, sse_payloads

FAST = {"max_denoising_steps": FAST_STEPS}
KEY = "lora-admin-key"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a1": save_adapter(tiny_model_dir, folder / "a1", seed=1),
        "a2": save_adapter(tiny_model_dir, folder / "a2", seed=2),
        "wide": save_adapter(tiny_model_dir, folder / "wide", seed=3, rank=32),  # above --max-lora-rank 16
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapters: dict[str, Path]) -> Iterator[RemoteServer]:
    flags = ["--enable-lora", "--lora-modules", f"a1={adapters['a1']}", "--max-loras", "2"]
    with RemoteServer(tiny_model_dir, *flags, "--allow-runtime-lora-updating") as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


def complete(client: openai.OpenAI, model: str, prompt: str = "hello", **extra: Any) -> str:
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=32, seed=7, extra_body={**FAST, **extra}
    )
    assert response.model == model
    assert response.choices[0].finish_reason in ("stop", "length")
    return response.choices[0].text


def load(http: httpx.Client, name: str, path: Path | str) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_models_lists_the_base_then_each_adapter_with_its_parent(
    client: openai.OpenAI, server: RemoteServer, adapters: dict[str, Path]
) -> None:
    base, adapter = client.models.list().data
    assert base.id == server.model_name and base.model_extra["parent"] is None
    assert adapter.id == "a1"
    assert adapter.model_extra["parent"] == server.model_name
    assert adapter.model_extra["root"] == str(adapters["a1"])


def test_the_openai_client_picks_an_adapter_by_model(client: openai.OpenAI, server: RemoteServer) -> None:
    base = complete(client, server.model_name)
    with_a1 = complete(client, "a1")
    assert complete(client, "a1") == with_a1  # seeded: the same adapter gives the same text
    assert with_a1 != base, "the adapter changed nothing: is it applied?"
    messages: Any = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="a1", messages=messages, max_tokens=16, extra_body=FAST)
    assert chat.model == "a1" and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="a1", messages=messages, max_tokens=16, stream=True, extra_body=FAST
    )
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {"a1"}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_an_unknown_model_is_vllms_404(client: openai.OpenAI, server: RemoteServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "no-such-adapter")
    assert "The model `no-such-adapter` does not exist." in str(caught.value)
    with server.http() as http:
        error = assert_openai_error(
            http.post(
                "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            ),
            404,
        )
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_load_use_and_unload_at_run_time_with_vllms_answers(
    client: openai.OpenAI, server: RemoteServer, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with server.http() as http:
        loaded = load(http, "a2", adapters["a2"])
        assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'a2' added successfully.")
        assert [model.id for model in client.models.list()] == [server.model_name, "a1", "a2"]
        assert complete(client, "a2") != complete(client, "a1")
        again = assert_openai_error(load(http, "a2", adapters["a2"]), 400)
        assert again["message"].startswith("The lora adapter 'a2' has already been loaded.")
        wide = assert_openai_error(load(http, "wide", adapters["wide"]), 400)
        assert "16" in wide["message"] and "lora_A" in wide["message"], wide  # names the tensor and the limit
        missing = assert_openai_error(load(http, "gone", tmp_path / "nowhere"), 404)
        assert missing["message"] == f"Loading lora gone failed: No adapter found for {tmp_path / 'nowhere'}"
        not_peft = assert_openai_error(load(http, "empty", tmp_path), 400)  # a folder with no adapter
        assert "adapter_config.json" in not_peft["message"], not_peft
        assert assert_openai_error(load(http, "", adapters["a2"]), 400)["message"] == (
            "Both 'lora_name' and 'lora_path' must be provided."
        )
        assert assert_openai_error(load(http, server.model_name, adapters["a2"]), 400)["param"] == "lora_name"
        assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)  # no path

        unloaded = unload(http, "a2")
        assert (unloaded.status_code, unloaded.text) == (
            200,
            "Success: LoRA adapter 'a2' removed successfully.",
        )
        assert [model.id for model in client.models.list()] == [server.model_name, "a1"]
        with pytest.raises(openai.NotFoundError):
            complete(client, "a2")
        assert (
            assert_openai_error(unload(http, "a2"), 404)["message"]
            == "The lora adapter 'a2' cannot be found."
        )
        assert load(http, "a2", adapters["a2"]).status_code == 200  # and back
        assert unload(http, "a2").status_code == 200


def stream_to_the_end(
    server: RemoteServer,
    model: str,
    seed: int,
    started: threading.Event,
    max_tokens: int = 320,
    steps: int = FAST_STEPS,
) -> tuple[str, float]:
    """One long streamed completion: its finish reason and when it came (raises on any error).
    `steps`: denoise steps a canvas at most (a random model's canvases run them all)."""
    body = {"model": model, "prompt": "count", "max_tokens": max_tokens, "seed": seed, "stream": True}
    body["max_denoising_steps"] = steps
    reason, finished_at = "", 0.0
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for payload in sse_payloads(response.iter_lines()):
            started.set()
            if payload == "[DONE]":
                break
            assert isinstance(payload, dict) and "error" not in payload, payload
            if payload["choices"][0]["finish_reason"]:
                reason, finished_at = payload["choices"][0]["finish_reason"], time.monotonic()
    return reason, finished_at


def test_load_and_unload_during_traffic_lose_no_request(
    server: RemoteServer, adapters: dict[str, Path]
) -> None:
    """Requests of the base, a1 and a2 stream while a2 is unloaded (then loaded again): every one runs
    to its end, and the unload answers only once a2's requests have ended."""
    with server.http() as http:
        assert load(http, "a2", adapters["a2"]).status_code == 200
    started = threading.Event()
    models = [server.model_name, "a1", "a2", "a2", "a1", server.model_name]
    with ThreadPoolExecutor(len(models)) as pool:
        futures = [pool.submit(stream_to_the_end, server, m, i, started) for i, m in enumerate(models)]
        assert started.wait(60)
        a2_futures = [f for f, m in zip(futures, models, strict=True) if m == "a2"]
        with server.http() as http:
            in_flight = sum(not f.done() for f in a2_futures)
            answer = unload(http, "a2")
            unloaded_at = time.monotonic()
            assert answer.status_code == 200, answer.text
            reload = load(http, "a2", adapters["a2"])
            assert reload.status_code == 200, reload.text
        results = [future.result(timeout=300) for future in futures]
    assert in_flight == 2, "the a2 requests ended before the unload: make them longer"
    assert all(reason in ("stop", "length") for reason, _ in results), results
    a2_ends = [end for (_, end), m in zip(results, models, strict=True) if m == "a2"]
    assert max(a2_ends) <= unloaded_at + 0.5, (a2_ends, unloaded_at)  # the unload waited for them
    with server.http() as http:
        assert unload(http, "a2").status_code == 200


def lora_info(metrics_text: str) -> list[dict[str, str]]:
    """The labels of every `vllm:lora_requests_info` sample."""
    return [
        sample.labels
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "vllm:lora_requests_info"
    ]


def test_the_engine_view_and_the_metrics_name_each_requests_adapter(
    client: openai.OpenAI, server: RemoteServer
) -> None:
    before = server.metrics()
    started = threading.Event()
    expected_info = [{"max_lora": "2", "running_lora_adapters": "a1", "waiting_lora_adapters": ""}]
    seen: dict[str, Any] = {}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream_to_the_end, server, "a1", 3, started, steps=16 * FAST_STEPS)
        assert started.wait(60)
        # The view and the gauge follow the engine's steps, each read on its own: look at both until
        # each has shown the running request (with FAST steps it can end before a single look).
        with server.http() as http:
            while not running.done() and len(seen) < 2:
                status = http.get("/v1/engine/status").json()
                rows = status["running"] + status["waiting"]
                if rows:
                    seen.setdefault("rows", (status, rows))
                info = lora_info(http.get("/metrics").text)
                if info[0]["running_lora_adapters"]:
                    seen.setdefault("info", info)
                time.sleep(0.01)
        running.result(timeout=300)
    assert set(seen) == {"rows", "info"}, f"the request ended before both showed it: {seen}"
    status, rows = seen["rows"]
    assert status["model"]["adapters"] == ["a1"]
    assert [row["lora_name"] for row in rows] == ["a1"], rows
    assert seen["info"] == expected_info
    complete(client, "a1")
    complete(client, server.model_name)
    after = server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    reasons = [
        f"canvas_serve_lora_request_success_total{{finished_reason={r},lora_name=a1}}"
        for r in ("length", "stop")
    ]
    assert sum(grew(name) for name in reasons) == 2  # the streamed request and one more; not the base's
    assert grew("canvas_serve_lora_prompt_tokens_total{lora_name=a1}") == 2 * 5  # "count", "hello"
    assert grew("canvas_serve_lora_generation_tokens_total{lora_name=a1}") > 0
    assert (
        sum(grew(f"canvas_serve_request_success_total{{finished_reason={r}}}") for r in ("length", "stop"))
        == 3
    )


def test_runtime_updating_is_off_by_default_and_behind_the_api_key(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    flags = ["--enable-lora", "--lora-modules", f"a1={adapters['a1']}", "--api-key", KEY]
    with RemoteServer(tiny_model_dir, *flags) as remote, remote.http() as http:
        assert_openai_error(load(http, "a2", adapters["a2"]), 401)
        assert_openai_error(unload(http, "a1"), 401)
        http.headers["Authorization"] = f"Bearer {KEY}"
        off = assert_openai_error(load(http, "a2", adapters["a2"]), 404)
        assert "--allow-runtime-lora-updating" in off["message"]
        assert_openai_error(unload(http, "a1"), 404)
        models = http.get("/v1/models").json()["data"]
        assert [model["id"] for model in models] == ["tiny", "a1"]


def test_a_bad_adapter_at_start_up_stops_the_server_with_one_clear_line(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    flags = ["--enable-lora", "--lora-modules", f"wide={adapters['wide']}", "--port", str(free_port())]
    result = subprocess.run(
        [*serve_command(), "serve", str(tiny_model_dir), "--device", "cpu", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"canvas-serve: --lora-modules wide={adapters['wide']}: "), result.stderr[-3000:]
    assert "lora_A" in last and "16" in last, last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_in_an_engine_thread_adapters_load_serve_and_unload_too(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    """--no-engine-process: the adapters of --lora-modules load in this process, and the service's
    load, request and unload go through the in-process client."""
    settings = Settings(
        model=tiny_model_dir,
        device="cpu",
        engine_process=False,
        enable_lora=True,
        lora_modules=[LoRAModule(name="a1", path=adapters["a1"])],
    )
    service, _ = build_service(settings)
    body = CompletionRequest(
        model="a2", prompt="hello", max_tokens=16, max_denoising_steps=FAST_STEPS, seed=1
    )

    async def scenario() -> tuple[str, list[str]]:
        service.engine.start()
        try:
            await service.served.load("a2", str(adapters["a2"]))
            accepted = await service.accept(body, service.completion_prompts(body), 16, "cmpl", "a2")
            collected = await service.collect(accepted)
            await service.served.unload("a2")
            return collected.reasons[0] or "", await service.engine.call_utility("list_loras")
        finally:
            service.engine.shutdown()

    reason, loaded = asyncio.run(scenario())
    assert reason in ("stop", "length")
    assert loaded == ["a1"]
