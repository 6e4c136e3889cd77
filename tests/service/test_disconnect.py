"""Clients that go away: their requests are aborted, the running count and KV use fall back to where
they were, and the abort counter says so."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.service.conftest import RemoteServer

RUNNING = "canvas_serve_num_requests_running{}"
WAITING = "canvas_serve_num_requests_waiting{}"
KV_USAGE = "canvas_serve_kv_cache_usage_perc{}"
ABORTS = "canvas_serve_request_success_total{finished_reason=abort}"
LONG = {"prompt": "hello", "max_tokens": 64, "max_denoising_steps": 1024, "confidence_threshold": 1e-30}
"""4 canvases of 1,024 steps each (the most a request may ask): far longer than any test waits. The
confidence threshold keeps the stop rule from ending a canvas early (a random model's canvas can settle
within a second: a client's 1 s read timeout then missed). With 200 steps a canvas, a CI run once saw
the whole request finish inside the 1 s timeout."""


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--max-num-seqs", "16"]


def wait_for(server: RemoteServer, expected: dict[str, float], timeout_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until every name in `expected` has its value; returns that scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        if all(metrics[name] == value for name, value in expected.items()):
            return metrics
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout_s}s: {[(name, metrics[name]) for name in expected]}, not {expected}")
        time.sleep(0.2)


def wait_until_idle(server: RemoteServer, kv_usage: float) -> dict[str, float]:
    """Nothing runs or waits and the KV use is back at `kv_usage`."""
    return wait_for(server, {RUNNING: 0, WAITING: 0, KV_USAGE: kv_usage})


async def open_and_drop(
    url: str, body: dict[str, Any], started: asyncio.Queue[str], drop: asyncio.Event
) -> None:
    """Open a stream, report its first event, wait for `drop`, then close the connection mid-stream."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                await started.put(line)
                await drop.wait()
                return
    pytest.fail("the stream ended before its first event")


@pytest.mark.slow
def test_twenty_dropped_streams_are_aborted_and_free_their_cache(server: RemoteServer) -> None:
    """16 run (max_num_seqs) and 4 wait; once the 16 have streamed a canvas, all clients drop. The
    4 waiting ones are admitted as the others leave, and drop after their first canvas."""
    before = server.metrics()
    assert before[RUNNING] == 0
    body = {**LONG, "stream": True, "stream_options": {"include_canvas": True}}

    async def drop_all() -> tuple[list[str], dict[str, float]]:
        started: asyncio.Queue[str] = asyncio.Queue()
        drop = asyncio.Event()
        clients = [asyncio.create_task(open_and_drop(server.url, body, started, drop)) for _ in range(20)]
        first_events = [await started.get() for _ in range(16)]
        during = await asyncio.to_thread(wait_for, server, {RUNNING: 16, WAITING: 4})
        drop.set()
        first_events += [await started.get() for _ in range(4)]
        await asyncio.gather(*clients)
        return first_events, during

    first_events, during = asyncio.run(drop_all())
    assert all('"canvas"' in event for event in first_events)
    assert during[KV_USAGE] > before[KV_USAGE]
    after = wait_until_idle(server, before[KV_USAGE])
    assert after[ABORTS] - before[ABORTS] == 20


@pytest.mark.slow
def test_dropped_whole_requests_are_aborted(server: RemoteServer) -> None:
    """A client that stops waiting for a non-streamed response (here: a read timeout) aborts it too."""
    before = server.metrics()

    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=1.0) as client:
            client.post("/v1/completions", json=LONG)

    for _ in range(3):
        give_up()
    after = wait_until_idle(server, before[KV_USAGE])
    assert after[ABORTS] - before[ABORTS] == 3


def test_the_server_still_serves_after_the_drops(server: RemoteServer) -> None:
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "max_denoising_steps": 2}
        )
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
