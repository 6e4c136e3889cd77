"""`canvas-serve serve MODEL --port P` as a subprocess for the browser tests; killed by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
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


class UIServer:
    """One server process on a fixed loopback port; `start()` may run again after `stop()` (a restart)."""

    def __init__(self, model_dir: Path, name: str, log_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"server-{name}-{self.port}.log"
        self.argv = [
            *serve_command(),
            "serve",
            str(model_dir),
            *("--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"),
            *("--served-model-name", name, "--drain-timeout", "1", "--log-level", "warning"),
            *flags,
        ]
        # One torch thread: the browser under test shares the two cores with the model.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UIServer:
        with self.log_path.open("ab") as log:
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
        self.stop()
        pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process by its PID (SIGKILL by default) unless it already exited, and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        """`GET /v1/engine/status`."""
        body: dict[str, Any] = httpx.get(f"{self.url}/v1/engine/status", timeout=30).json()
        return body
