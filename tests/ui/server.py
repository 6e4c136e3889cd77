"""`canvas-serve serve MODEL --port P` as a subprocess for the browser tests; killed by its PID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.server_process import ServerProcess


class UIServer(ServerProcess):
    """One server process on a fixed loopback port, served as `name`, logging to `log_dir`; `start()`
    may run again after `kill()` (a restart on the same port)."""

    def __init__(self, model_dir: Path, name: str, log_dir: Path, *flags: str) -> None:
        ui_flags = ["--served-model-name", name, "--drain-timeout", "1", "--log-level", "warning"]
        # One torch thread: the browser under test shares the two cores with the model.
        env = {"OMP_NUM_THREADS": "1"}
        super().__init__(model_dir, *ui_flags, *flags, log_dir=log_dir, log_name=f"server-{name}", env=env)

    def status(self) -> dict[str, Any]:
        """`GET /v1/engine/status`."""
        body: dict[str, Any] = httpx.get(f"{self.url}/v1/engine/status", timeout=30).json()
        return body
