"""Two replicas of the real server on a tiny random checkpoint, shared by the deploy tests.

Started together (they load in parallel), killed by PID once the deploy tests are done. The
scale-out test takes replica 0 down; the other tests use replica 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.processes import Replica
from tests.engine.checkpoints import save_servable


@pytest.fixture(scope="package")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_servable(tmp_path_factory.mktemp("deploy") / "tiny")


@pytest.fixture(scope="package")
def replicas(tiny_checkpoint: Path) -> Iterator[list[Replica]]:
    steps = json.dumps({"max_denoising_steps": 4})
    started = [Replica(tiny_checkpoint, "--diffusion-config", steps, "--drain-timeout", "30") for _ in "ab"]
    try:
        for replica in started:
            replica.launch()
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.kill()


@pytest.fixture(scope="package")
def replica(replicas: list[Replica]) -> Replica:
    """The replica that stays up throughout the deploy tests."""
    return replicas[1]
