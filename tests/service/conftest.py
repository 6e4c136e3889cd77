"""The real server as a subprocess (vLLM's RemoteOpenAIServer pattern) on a tiny random checkpoint.

`server` is one module-scoped server with the default flags; a module changes them by overriding the
`server_args` fixture. A test that needs its own server (one it signals, floods or starves) uses
`RemoteServer(tiny_model_dir, *flags)` as a context manager. Every server listens on a free loopback
port, is ready once `GET /ready` answers 200, and is killed by its PID when the fixture or the
`with` block ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.engine.checkpoints import save_servable
from tests.server_process import ServerProcess

FAST_STEPS = 4
"""max_denoising_steps that keeps a request to a fraction of a second on the CPU."""


class RemoteServer(ServerProcess):
    """`canvas-serve serve MODEL_DIR --port P [flags]` with the official and the plain HTTP client;
    `start()` (or `with`) returns once ready, and a server that dies or never gets ready fails the test
    with the tail of its log."""

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """The official client; no retries, so a 429 or 503 surfaces as the exception it is."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, **kwargs)

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


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
    return save_servable(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    """Extra `canvas-serve serve` flags of this module's `server`; override in a module to change."""
    return []


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_args: list[str]) -> Iterator[RemoteServer]:
    with RemoteServer(tiny_model_dir, *server_args) as remote:
        yield remote
