"""The engine-view endpoints and the packaged page, over HTTP (no browser needed)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from typing import Any

import httpx
import pytest

from service.engine_view import safe_copy
from service.ui import STATIC_DIR
from tests.ui.server import UIServer

PUZZLE = "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3"


def stream_in_background(url: str, body: dict[str, Any], stop: threading.Event) -> threading.Thread:
    """A streamed completion read until `stop` is set, then closed (which aborts it on the server)."""

    def run() -> None:
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{url}/v1/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_status_lists_the_requests_sharing_the_steps(server: UIServer) -> None:
    stop = threading.Event()
    body = {
        "prompt": PUZZLE,
        "max_denoising_steps": 1024,
        "stream": True,
        "stream_options": {"include_canvas": True},  # a line every step, so the readers see `stop`
    }
    threads = [stream_in_background(server.url, {**body, "seed": s}, stop) for s in range(2)]
    try:
        deadline = time.monotonic() + 60
        status = server.status()
        while len(status["running"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = server.status()
        time.sleep(1.0)
        status = server.status()
    finally:
        stop.set()
    assert status["model"]["name"] == "sudoku-untrained"
    assert status["model"]["canvas_length"] == 82
    assert status["model"]["defaults"]["max_denoising_steps"] == 48
    assert status["alive"] is True and status["draining"] is False
    rows = status["running"]
    assert len(rows) >= 2, status
    for row in rows:
        assert row["id"].startswith("cmpl-") and row["id"].endswith("-0")
        assert row["status"] == "running" and row["canvas_index"] == 0 and row["max_steps"] == 1024
        assert 0 < row["step"] <= row["denoise_steps"]
        assert row["prompt_tokens"] == 82  # <bos> + 81 cells
    assert 0 < status["kv_usage"] <= 1
    assert status["last_step"]["num_denoise_canvases"] >= 1
    assert status["throughput"]["engine_steps_per_s"] > 0
    assert status["totals"]["denoise_passes"] >= sum(r["denoise_steps"] for r in rows)
    for thread in threads:
        thread.join(30)


def test_events_push_snapshots(server: UIServer) -> None:
    snapshots = []
    with httpx.stream("GET", f"{server.url}/v1/engine/events?interval_ms=50", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                snapshots.append(json.loads(line.removeprefix("data: ")))
            if len(snapshots) == 3:
                break
    assert all(s["model"]["name"] == "sudoku-untrained" for s in snapshots)
    assert snapshots[0]["time"] < snapshots[2]["time"]


def test_token_texts(server: UIServer) -> None:
    body = httpx.get(f"{server.url}/v1/engine/tokens", params={"ids": "1,5,6,14,15"}).json()
    assert body == {"ids": [1, 5, 6, 14, 15], "tokens": ["<eos>", ".", "1", "9", "\n"]}
    for ids in ("1,x", "99999", ",".join(["1"] * 5000)):
        response = httpx.get(f"{server.url}/v1/engine/tokens", params={"ids": ids})
        assert response.status_code == 400, ids
        assert response.json()["error"]["param"] == "ids"


def test_the_page_and_its_files_are_served_from_the_package(server: UIServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in sorted(STATIC_DIR.iterdir()):
        response = httpx.get(f"{server.url}/static/{path.name}")
        assert response.status_code == 200, path.name
        # Nothing may come from the internet: no absolute URL in any shipped file.
        assert not re.search(r"https?://", response.text), path.name


@pytest.mark.parametrize("error", [RuntimeError("deque mutated during iteration"), None])
def test_safe_copy_tolerates_a_container_changing_under_it(error: Exception | None) -> None:
    items = deque([1, 2, 3])
    calls = []

    def flaky() -> deque[int]:
        calls.append(1)
        if error is not None and len(calls) < 3:
            raise error
        return items

    assert safe_copy(flaky) == [1, 2, 3]
    assert safe_copy(lambda: (_ for _ in ()).throw(RuntimeError("always"))) == []
