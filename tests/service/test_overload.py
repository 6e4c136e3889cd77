"""A full waiting queue: 429 with Retry-After in OpenAI's shape, and every admitted request completes.

The server runs one request at a time and queues one more (`--max-num-seqs 1 --max-waiting 1`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.service.conftest import RemoteServer, assert_openai_error

WAITING = "canvas_serve_num_requests_waiting{}"
QUEUE_FULL = "canvas_serve_requests_rejected_total{reason=queue_full}"
LONG = {"prompt": "hello", "max_tokens": 16, "max_denoising_steps": 200}


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--max-num-seqs", "1", "--max-waiting", "1"]


class LongStream:
    """A long streamed request in a thread; `started` is set once its first event arrived."""

    def __init__(self, server: RemoteServer) -> None:
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(server.url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        body = {**LONG, "stream": True, "stream_options": {"include_canvas": True}}
        with (
            httpx.Client(base_url=url, timeout=120) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                self.started.set()
                if self.stop.is_set():
                    return  # closing the connection aborts the request

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def queue_full(server: RemoteServer) -> Iterator[None]:
    """One long request running and one waiting (seen in /metrics), closed at the end."""
    running = LongStream(server)
    assert running.started.wait(60)
    waiting = LongStream(server)
    deadline = time.monotonic() + 30
    while server.metrics()[WAITING] != 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.1)
    yield
    running.close()  # first: the waiting one streams (and sees its stop) only once it runs
    waiting.close()


@pytest.mark.slow
def test_a_full_queue_gets_429_with_retry_after(server: RemoteServer, queue_full: None) -> None:
    before = server.metrics()[QUEUE_FULL]
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    for refused in (response, chat):
        error = assert_openai_error(refused, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as raised:
        server.client().completions.create(model=server.model_name, prompt="hi", max_tokens=4)
    assert raised.value.status_code == 429
    assert server.metrics()[QUEUE_FULL] - before == 3


@pytest.mark.slow
def test_a_flood_gets_429s_and_every_admitted_request_completes(server: RemoteServer) -> None:
    body = {"prompt": "hello", "max_tokens": 16, "max_denoising_steps": 20}

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            return http.post("/v1/completions", json=body)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            assert_openai_error(response, 429)
            assert "retry-after" in response.headers
        else:
            result: dict[str, Any] = response.json()
            (choice,) = result["choices"]
            assert choice["finish_reason"] in ("stop", "length")
            assert result["usage"]["denoise_steps"] > 0


def test_the_queue_frees_up_after_the_flood(server: RemoteServer) -> None:
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "max_denoising_steps": 2}
        )
    assert response.status_code == 200
