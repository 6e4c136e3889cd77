"""Refused generation requests counted by reason through GET /metrics (the app in-process, a tiny model):
every reason of REJECT_REASONS, and no count for /ready probes or unknown routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.scheduler import QueueFull
from service.app import create_app
from service.metrics import REJECT_REASONS, rejection_reason
from service.model_setup import build_service
from service.settings import Settings
from tests.engine.checkpoints import save_servable

REJECTED = "canvas_serve_requests_rejected_total"


def rejected(client: TestClient) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {s.labels["reason"]: s.value for f in families for s in f.samples if s.name == REJECTED}


def test_the_reason_comes_from_the_error_code_else_from_a_4xx_status() -> None:
    assert rejection_reason(429, "queue_full") == "queue_full"
    assert rejection_reason(503, "draining") == "draining"
    assert rejection_reason(503, "engine_dead") == "engine_dead"
    assert rejection_reason(400, None) == rejection_reason(404, "model_not_found") == "invalid"
    assert rejection_reason(500, "internal_error") is None and rejection_reason(200, None) is None


def test_every_refusal_is_counted_under_its_reason_and_ready_probes_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model=save_servable(tmp_path), device="cpu", engine_process=False)
    service, metrics = build_service(settings)  # in-process: the test reaches into its scheduler
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": 4, "max_denoising_steps": 2}
    with TestClient(create_app(service, metrics)) as client:
        assert rejected(client) == dict.fromkeys(REJECT_REASONS, 0.0)  # every label from the start
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json={**body, "prompt": ""}).status_code == 400
        assert client.post("/v1/chat/completions", json={"messages": 1}).status_code == 400
        assert client.post("/v1/completions", json={**body, "model": "other"}).status_code == 404
        assert client.get("/v1/no-such-route").status_code == 404  # no request refused

        def full(*args: Any, **kwargs: Any) -> None:
            raise QueueFull("the bound")

        with monkeypatch.context() as patch:
            patch.setattr(service.engine.engine.scheduler, "add_request", full)
            assert client.post("/v1/completions", json=body).status_code == 429

        service.draining = True
        for _ in range(3):
            assert client.get("/ready").status_code == 503
        assert client.post("/v1/completions", json=body).status_code == 503
        service.draining = False

        service.engine.shutdown()
        assert client.get("/ready").status_code == 503
        assert client.post("/v1/completions", json=body).status_code == 503
        counts = rejected(client)
    assert counts == {"invalid": 3, "queue_full": 1, "draining": 1, "engine_dead": 1}
