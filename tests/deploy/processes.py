"""Server and router processes on loopback ports, and the deploy tools' whereabouts.

`Replica` is `canvas-serve serve` on a tiny checkpoint; `Router` is vLLM's router (`vllm-router`, from
the tools venv that `make deploy-tools` builds) in static mode in front of replicas. Each process is
killed by its own PID when done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.server_process import REPO, Process, ServerProcess, free_port, scrape

TOOLS_BIN = REPO / ".venv-deploy" / "bin"
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


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{", 1)[0] == name and all(w in key.split("{", 1)[1][:-1].split(",") for w in wanted)
    )


class Replica(ServerProcess):
    """`canvas-serve serve MODEL_DIR` on a free loopback port, served as "tiny"."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        super().__init__(model_dir, "--served-model-name", "tiny", *flags, log_name="replica")


class Router(Process):
    """vLLM's router in static mode: round robin over `replicas`, retries on, health from /ready."""

    ready_path = "/readiness"

    def __init__(self, binary: str, replicas: list[Replica], log_dir: Path, *flags: str) -> None:
        port, self.metrics_port = free_port(), free_port()
        argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
        argv += ["--worker-urls", *(r.url for r in replicas), "--health-check-endpoint", "/ready"]
        argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port)]
        argv += ["--log-level", "warning", *flags]
        super().__init__(argv, port, log_dir / f"router-{port}.log")

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")
