"""An API key through vLLM's router (the front deploy/k8s/router.yaml runs): the router checks replica
health on /ready (open), and forwards the client's `Authorization` header, so a keyed replica serves
requests that carry the key and refuses the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.processes import FAST, Replica, Router, require

pytestmark = pytest.mark.slow
KEY = "router-test-key"


@pytest.fixture
def keyed_front(tiny_checkpoint: Path) -> Iterator[Router]:
    binary = require("vllm-router")
    with Replica(tiny_checkpoint, "--api-key", KEY) as replica:
        front = Router(binary, [replica], replica.log_path.parent)
        front.launch()
        try:
            front.wait_ready(60)
            yield front
        finally:
            front.kill()


def test_the_router_passes_the_key_through_to_a_keyed_replica(keyed_front: Router) -> None:
    body = {"model": "tiny", "prompt": "hi", **FAST}
    with httpx.Client(base_url=keyed_front.url, timeout=120) as http:
        assert http.post("/v1/completions", json=body).status_code == 401
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        served = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["finish_reason"] in ("stop", "length")
