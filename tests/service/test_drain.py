"""SIGTERM under load: in-flight streams finish, new requests get 503 (or a refused connection once the
server is gone), and the process exits 0 within the drain timeout plus a few seconds, whether the engine
runs in its own process (the default) or in a thread of the server's."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import RemoteServer, assert_openai_error, sse_payloads

EXIT_SLACK_S = 15.0
"""Beyond the drain timeout: the last steps, uvicorn's shutdown and the engine thread's join."""


class Streamer:
    """One streamed completion in a thread: `started` once its first event arrived; then every chunk."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.url, self.body = url, {**body, "stream": True, "stream_options": {"include_canvas": True}}
        self.started = threading.Event()
        self.chunks: list[dict[str, Any] | str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=120) as http,
                http.stream("POST", "/v1/completions", json=self.body) as response,
            ):
                assert response.status_code == 200
                for payload in sse_payloads(response.iter_lines()):
                    self.chunks.append(payload)
                    self.started.set()
        except BaseException as error:
            self.error = error
            self.started.set()

    def finish_reason(self, timeout_s: float) -> str:
        """Join; the stream must have ended with a finish reason, then `[DONE]`, and no error."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.error is None, repr(self.error)
        assert self.chunks and self.chunks[-1] == "[DONE]", self.chunks[-3:]
        chunks = [c for c in self.chunks[:-1] if isinstance(c, dict)]
        assert not any("error" in c for c in chunks), chunks[-1]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert len(reasons) == 1, reasons
        reason: str = reasons[0]
        return reason


def refused_while_draining(server: RemoteServer) -> str:
    """A new request during the drain: "503" (checked in full) or "refused" once the server is gone."""
    try:
        with server.http(timeout=30) as http:
            deadline = time.monotonic() + 10  # the signal is handled asynchronously
            while (ready := http.get("/ready")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    except httpx.TransportError:
        return "refused"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    error = assert_openai_error(response, 503)
    assert error["type"] == "service_unavailable_error" and error["code"] == "draining"
    assert "retry-after" in response.headers
    return "503"


def start_streams(server: RemoteServer, body: dict[str, Any], count: int) -> list[Streamer]:
    streamers = [Streamer(server.url, body) for _ in range(count)]
    for streamer in streamers:
        assert streamer.started.wait(60), "no first event"
        assert streamer.error is None, repr(streamer.error)
    return streamers


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["--engine-process", "--no-engine-process"])
def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_model_dir: Path, engine: str) -> None:
    drain_timeout = 60.0
    with RemoteServer(tiny_model_dir, "--drain-timeout", str(drain_timeout), engine) as server:
        body = {"prompt": "hello", "max_tokens": 32, "max_denoising_steps": 40, "seed": 1}
        streamers = start_streams(server, body, 3)
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert refused_while_draining(server) == "503"
        for streamer in streamers:
            assert streamer.finish_reason(drain_timeout) in ("stop", "length")
        assert server.wait(drain_timeout + EXIT_SLACK_S) == 0
        assert time.monotonic() - start < drain_timeout + EXIT_SLACK_S
        assert refused_while_draining(server) == "refused"
        assert "Traceback" not in server.log_path.read_text()


@pytest.mark.slow
def test_the_drain_timeout_aborts_what_is_left_and_exits_0(tiny_model_dir: Path) -> None:
    """Streams that would run for minutes end with finish_reason "abort" (and `[DONE]`) once the drain
    timeout passes; the process still exits 0, soon after."""
    drain_timeout = 2.0
    with RemoteServer(tiny_model_dir, "--drain-timeout", str(drain_timeout)) as server:
        body = {"prompt": "hello", "max_tokens": 256, "max_denoising_steps": 1000}
        streamers = start_streams(server, body, 2)
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(drain_timeout + EXIT_SLACK_S) == 0
        assert time.monotonic() - start < drain_timeout + EXIT_SLACK_S
        for streamer in streamers:
            assert streamer.finish_reason(10) == "abort"
        assert "drain timeout: aborting 2 in-flight requests" in server.log_path.read_text()
