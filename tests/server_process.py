"""`canvas-serve serve` (or another HTTP tool) as a subprocess on a free loopback port, for the tests
that talk to the real server.

A process picks its port once, at construction, so `start()` after `kill()` is a restart on the same
URL. It is ready once its readiness path answers 200; it logs to a file, whose tail is the failure
message when it dies or never gets ready; it is signalled and killed by its own PID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0
"""Importing torch and transformers on two busy cores can take a while."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_command() -> list[str]:
    """The installed `canvas-serve` script beside this Python, else `python -m service.cli`."""
    script = Path(sys.executable).with_name("canvas-serve")
    if script.is_file():
        return [str(script)]
    found = shutil.which("canvas-serve")
    return [found] if found else [sys.executable, "-m", "service.cli"]


def scrape(url: str, drop: Collection[str] = ()) -> dict[str, float]:
    """`GET url` (a Prometheus exposition) as {"name{k=v,...}": value}, labels sorted, `drop` left out."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in drop)
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


class Process:
    """`argv` in a subprocess serving HTTP on `port`, its output in `log_path`; also a context manager
    (`with` starts it and kills it)."""

    ready_path = "/ready"
    tls: ssl.SSLContext | None = None
    """Set for a process that speaks HTTPS: the client context its readiness is checked with."""

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.port, self.log_path = argv, port, log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Self:
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def launch(self) -> None:
        """Start without waiting: a fresh log on the first launch, appended to on a restart."""
        with self.log_path.open("wb" if self.process is None else "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=log)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Return once `ready_path` answers 200; fail the test with the log's tail if the process exits
        first or is not ready within `timeout_s` (then it is killed)."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.command} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + self.ready_path, timeout=2, verify=self.tls or True)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"{self.command} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    @property
    def command(self) -> str:
        return shlex.join(self.argv[:3])

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int:
        """The exit code, once the process exits within `timeout_s`."""
        assert self.process is not None, "not started"
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """Kill by PID (SIGKILL) unless it already exited, and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


class ServerProcess(Process):
    """`canvas-serve serve MODEL_DIR --host 127.0.0.1 --port P --device cpu [flags]`, logging to
    `{log_dir}/{log_name}-{port}.log` (log_dir defaults to the model's parent folder)."""

    def __init__(
        self,
        model_dir: Path,
        *flags: str,
        log_dir: Path | None = None,
        log_name: str = "server",
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = model_dir
        port = free_port()
        argv = [*serve_command(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--device", "cpu", *flags]
        super().__init__(argv, port, (log_dir or model_dir.parent) / f"{log_name}-{port}.log", env)

    def metrics(self) -> dict[str, float]:
        """`GET /metrics` as {"name{k=v,...}": value}, labels sorted, model_name dropped (one server
        serves one model)."""
        return scrape(f"{self.url}/metrics", drop={"model_name"})
