"""Scale-out on loopback: two replicas behind vLLM's router (the front deploy/k8s/router.yaml runs).

Requests spread over both replicas; when one is taken down (SIGTERM: it drains, then exits) every
request sent through the router still succeeds, because the router retries the ones the leaving
replica refuses (503 while draining) or cannot take (connection refused once gone) on the other,
the request in flight on the leaving replica finishes, and the other replica keeps serving.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.deploy.processes import FAST, Replica, Router, require, total

pytestmark = pytest.mark.slow
COMPLETIONS = "/v1/completions"


@pytest.fixture
def router(replicas: list[Replica]) -> Iterator[Router]:
    # Health checks every 60 s (the default) so that, within the test, only retries can hide the
    # replica that goes away: the test then shows the retries, not the health checker, at work.
    front = Router(require("vllm-router"), replicas, replicas[0].log_path.parent)
    front.launch()
    try:
        front.wait_ready(60)
        yield front
    finally:
        front.kill()


def served(replica: Replica) -> float:
    return total(replica.metrics(), "canvas_serve_http_responses_total", route=COMPLETIONS, status="200")


def send(front: Router, count: int) -> list[int]:
    with httpx.Client(base_url=front.url, timeout=120) as http:
        body = {"model": "tiny", "prompt": "hi", **FAST}
        return [http.post(COMPLETIONS, json=body).status_code for _ in range(count)]


def stream_through(front: Router) -> list[str]:
    """The data lines of a streamed chat completion with live canvases, sent through the router."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, **FAST}
    body["stream_options"] = {"include_canvas": True}
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return lines


def stream_long(url: str, started: threading.Event, result: list[tuple[int, str]]) -> None:
    """Stream a long completion (every canvas of its 320 tokens) from `url`; set `started` at its
    first chunk; append (status, last data line)."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 320, "max_denoising_steps": 16, "stream": True}
    last = ""
    with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                started.set()
                last = line
    result.append((response.status_code, last))


def test_requests_spread_and_survive_a_replica_going_away(router: Router, replicas: list[Replica]) -> None:
    leaving, staying = replicas
    before = [served(r) for r in replicas]
    assert send(router, 8) == [200] * 8
    spread = [served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert spread[0] > 0 and spread[1] > 0 and sum(spread) == 8, f"round robin spread: {spread}"
    assert len(stream_through(router)) > 2, "a stream passes through the router chunk by chunk"

    # A long request in flight on the leaving replica, sent to it directly and streamed, so that its
    # first chunk says it is running (it lasts about a second on the tiny model: polling the metrics
    # for it could miss it).
    long_result: list[tuple[int, str]] = []
    started = threading.Event()
    thread = threading.Thread(target=stream_long, args=(leaving.url, started, long_result))
    thread.start()
    assert started.wait(30), "the long request never started streaming"
    assert thread.is_alive(), "the long request should still be running when the drain starts"

    staying_before = served(staying)
    leaving.signal(signal.SIGTERM)  # what Kubernetes' preStop hook sends: drain, then exit
    while_draining = send(router, 6)
    thread.join(120)
    assert leaving.wait(60) == 0, leaving.log_tail()
    after_exit = send(router, 6)

    assert long_result == [(200, "data: [DONE]")], "the request in flight on the draining replica must finish"
    assert while_draining == [200] * 6 and after_exit == [200] * 6, (while_draining, after_exit)
    assert served(staying) - staying_before == 12, "the staying replica served every routed request"
    retries = total(router.metrics(), "vllm_router_retries_total")
    assert retries > 0, "the router should have retried the requests the leaving replica refused"
    assert "drain" in leaving.log_tail(20000)
