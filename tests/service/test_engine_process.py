"""The real server with its engine core in a process of its own (`--engine-process`, the default):
completions and streams work, a dropped stream is aborted in the core and its request is gone from the
engine's statistics, admission errors keep their status and field, and a killed engine process turns
/ready, /health and generation into 503s (and open streams into an in-band error) instead of hangs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import RemoteServer, assert_openai_error, sse_payloads

RUNNING = "canvas_serve_num_requests_running{}"
ABORTS = "canvas_serve_request_success_total{finished_reason=abort}"
STOPS = "canvas_serve_request_success_total{finished_reason=stop}"
ALIVE = "canvas_serve_engine_alive{}"
BODY = {"prompt": "hello", "max_tokens": 32, "max_denoising_steps": 4, "seed": 3}
LONG = {
    "prompt": "hello",
    "max_tokens": 64,
    "max_denoising_steps": 1000,
    "seed": 1,
    "confidence_threshold": 1e-30,
}
"""Runs for seconds: the near-zero confidence threshold keeps the stop rule from ending its canvases
early (as tests/service/test_disconnect.py's LONG)."""


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--engine-process", "--engine-threads", "1"]


def engine_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == server_pid and b"spawn_main" in command and b"resource_tracker" not in command:
            found.append(int(entry.name))
    assert len(found) == 1, f"engine processes of {server_pid}: {found}"
    return found[0]


def wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_completion_and_a_stream(server: RemoteServer) -> None:
    with server.http() as http:
        whole = http.post("/v1/completions", json=BODY)
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as response:
            assert response.status_code == 200
            payloads = list(sse_payloads(response.iter_lines()))
        status = http.get("/v1/engine/status").json()
    assert payloads[-1] == "[DONE]"
    chunks = [p for p in payloads if isinstance(p, dict)]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == body["choices"][0]["text"], "same seed, same text: streamed and whole"
    assert status["alive"] is True and status["totals"]["committed_tokens"] > 0


def test_a_stop_string_counts_as_a_stop_not_an_abort(server: RemoteServer) -> None:
    """The API process finds stop strings and ends the core's request: the core records it as a
    "stop" (it used to count as an abort)."""
    with server.http() as http:
        text = http.post("/v1/completions", json={**BODY, "max_tokens": 64}).json()["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        assert stop, f"the reference text is too short to cut: {text!r}"
        before = server.metrics()
        cut = http.post("/v1/completions", json={**BODY, "max_tokens": 64, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stop not in cut["choices"][0]["text"]
    wait_for(lambda: server.metrics()[STOPS] == before[STOPS] + 1)
    assert server.metrics()[ABORTS] == before[ABORTS]


def test_admission_errors_keep_their_status_and_field(server: RemoteServer) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", json={**BODY, "prompt": [2, 999_999]})
        error = assert_openai_error(response, 400)
        assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]
        too_long = http.post("/v1/completions", json={**BODY, "max_tokens": 10**6})
        assert "maximum context length" in assert_openai_error(too_long, 400)["message"]


def test_a_dropped_stream_is_aborted_in_the_engine_process(server: RemoteServer) -> None:
    aborts = server.metrics()[ABORTS]
    body = {**LONG, "stream": True, "stream_options": {"include_canvas": True}}
    with (
        server.http() as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # held: a collected iterator would close the connection early
        first = next(line for line in lines if line.startswith("data: "))
        assert '"canvas"' in first
        wait_for(lambda: server.metrics()[RUNNING] == 1)
    wait_for(lambda: server.metrics()[ABORTS] == aborts + 1)
    metrics = server.metrics()
    assert metrics[RUNNING] == 0 and metrics["canvas_serve_kv_cache_usage_perc{}"] == 0
    wait_for(lambda: httpx.get(f"{server.url}/v1/engine/status").json()["running"] == [])


@pytest.mark.slow
def test_a_killed_engine_process_is_a_503_not_a_hang(tiny_model_dir: Path) -> None:
    with RemoteServer(tiny_model_dir, "--engine-process") as server, server.http(timeout=60) as http:
        assert server.metrics()[ALIVE] == 1
        body = {**LONG, "stream": True, "stream_options": {"include_canvas": True}}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(engine_pid(server.pid), signal.SIGKILL)
            rest = list(sse_payloads(lines))  # the stream ends: an in-band error, then [DONE]
        assert rest[-1] == "[DONE]"
        errors = [p["error"] for p in rest if isinstance(p, dict) and "error" in p]
        assert errors and errors[0]["code"] == "engine_dead", rest[-3:]
        ready = http.get("/ready")
        assert ready.status_code == 503 and "retry-after" in ready.headers
        assert http.get("/health").status_code == 503
        refused = assert_openai_error(http.post("/v1/completions", json=BODY), 503)
        assert refused["code"] == "engine_dead"
        metrics = server.metrics()
        assert metrics[ALIVE] == 0
        assert metrics["canvas_serve_requests_rejected_total{reason=engine_dead}"] == 1
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert "was killed by SIGKILL" in server.log_path.read_text()
