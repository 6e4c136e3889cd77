"""Server and router processes on loopback ports, and the deploy tools' whereabouts.

`Replica` is `canvas-serve serve` on a tiny checkpoint; `Router` is vLLM's router (`vllm-router`, from
the tools venv that `make deploy-tools` builds) in static mode in front of replicas. Each process is
killed by its own PID when done.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".venv-deploy" / "bin"
STARTUP_TIMEOUT_S = 180.0
"""Importing torch and transformers on two busy cores can take a while."""
FAST = {"max_tokens": 16, "max_denoising_steps": 2}
"""Request fields that keep a completion to a fraction of a second on the tiny model."""


def tool(name: str) -> str | None:
    """A deploy tool from the tools venv, else from PATH; None when it is not installed."""
    if (TOOLS_BIN / name).is_file():
        return str(TOOLS_BIN / name)
    return shutil.which(name)


def require(name: str) -> str:
    """The tool's path, or skip the test saying how to install it; with DEPLOY_CHECK_STRICT=1 (set by
    `make deploy-check` and CI) a missing tool fails the test instead."""
    path = tool(name)
    if path is None:
        reason = f"{name} is not installed: `make deploy-tools` installs it"
        if os.environ.get("DEPLOY_CHECK_STRICT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(url: str) -> dict[str, float]:
    """`GET url` (a Prometheus exposition) as {'name{k=v,...}': value}, labels sorted."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{", 1)[0] == name and all(w in key.split("{", 1)[1][:-1].split(",") for w in wanted)
    )


class Process:
    """A subprocess logging to a file, ready once `ready_path` answers 200."""

    ready_path = "/ready"

    def __init__(self, argv: list[str], log_path: Path, port: int) -> None:
        self.argv, self.log_path, self.port = argv, log_path, port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=log, stderr=log)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.argv[:3]} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"{self.argv[:3]} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


class Replica(Process):
    """`canvas-serve serve MODEL_DIR` on a free loopback port, served as "tiny"."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "service.cli", "serve", str(model_dir), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--device", "cpu", "--served-model-name", "tiny", *flags]
        super().__init__(argv, model_dir.parent / f"replica-{port}.log", port)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url + "/metrics")


class Router(Process):
    """vLLM's router in static mode: round robin over `replicas`, retries on, health from /ready."""

    ready_path = "/readiness"

    def __init__(self, binary: str, replicas: list[Replica], log_dir: Path, *flags: str) -> None:
        port, self.metrics_port = free_port(), free_port()
        argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
        argv += ["--worker-urls", *(r.url for r in replicas), "--health-check-endpoint", "/ready"]
        argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port)]
        argv += ["--log-level", "warning", *flags]
        super().__init__(argv, log_dir / f"router-{port}.log", port)

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")
