"""The real server as a subprocess (vLLM's RemoteOpenAIServer pattern) on a tiny random checkpoint.

`server` is one module-scoped server with the default flags; a module changes them by overriding the
`server_args` fixture. A test that needs its own server (one it signals, floods or starves) uses
`RemoteServer(tiny_model_dir, *flags)` as a context manager. Every server listens on a free loopback
port, is ready once `GET /ready` answers 200, and is killed by its PID when the fixture or the
`with` block ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.checkpoints import save_reference, save_tokenizer

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0
"""Importing torch and transformers on two busy cores can take a while."""
FAST_STEPS = 4
"""max_denoising_steps that keeps a request to a fraction of a second on the CPU."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RemoteServer:
    """`canvas-serve serve MODEL_DIR --port P [flags]` in a subprocess; `start()` returns once ready.

    The server's output goes to `log_path`; a server that dies or never gets ready fails the test with
    the tail of that log.
    """

    def __init__(self, model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.log_path = model_dir.parent / f"server-{self.port}.log"
        self.argv = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *flags,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def start(self) -> RemoteServer:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Kill by PID (SIGKILL) unless it already exited, and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    # -- clients ---------------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """The official client; no retries, so a 429 or 503 surfaces as the exception it is."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, **kwargs)

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """`GET /metrics` as {"name{label=value,...}": value}, labels sorted, model_name dropped."""
        body = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples


def sse_payloads(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    """The data of each server-sent event: a parsed JSON object, or the raw "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        yield data if data == "[DONE]" else json.loads(data)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response has `status` and OpenAI's error body; returns its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffusionGemma (vocab 128, canvas 16) with a char-level tokenizer, named "tiny"."""
    path = tmp_path_factory.mktemp("checkpoint") / "tiny"
    save_reference(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    """Extra `canvas-serve serve` flags of this module's `server`; override in a module to change."""
    return []


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_args: list[str]) -> Iterator[RemoteServer]:
    with RemoteServer(tiny_model_dir, *server_args) as remote:
        yield remote
