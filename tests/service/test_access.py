"""Access control on the real server: API keys on every /v1 route (the official client too), probes
and the scrape open, CORS for one allowed origin, and the request-body limit (413, server unharmed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.service.conftest import FAST_STEPS, RemoteServer, assert_openai_error

KEY = "test-key-7c1e"
OTHER_KEY = "test-key-rotated"
ALLOWED = "https://allowed.example"
MAX_BODY = 64 * 1024
FAST = {"max_tokens": 8, "max_denoising_steps": FAST_STEPS}


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return [
        *("--api-key", KEY, "--api-key", OTHER_KEY),
        *("--allowed-origins", ALLOWED, "--allowed-methods", "GET", "--allowed-methods", "POST"),
        *("--max-request-body-bytes", str(MAX_BODY)),
    ]


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


def v1_requests(model: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """One request to each /v1 route: (method, path, JSON body)."""
    return [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", **FAST}),
        (
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}], **FAST},
        ),
        ("GET", "/v1/engine/status", None),
        ("GET", "/v1/engine/events?interval_ms=50", None),
        ("GET", "/v1/engine/tokens?ids=1,2", None),
    ]


def send(http: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    """The response's status and headers, and its body unless it is the endless engine-event stream
    (then its first event)."""
    with http.stream(method, path, json=body, headers=headers) as response:
        if response.status_code == 200 and path.startswith("/v1/engine/events"):
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            return response
        response.read()
        return response


def test_every_v1_route_refuses_a_missing_or_wrong_key_and_serves_the_right_ones(
    http: httpx.Client, server: RemoteServer
) -> None:
    for method, path, body in v1_requests(server.model_name):
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": KEY}):
            error = assert_openai_error(send(http, method, path, body, headers), 401)
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        for key in (KEY, OTHER_KEY):
            response = send(http, method, path, body, {"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, (
                path,
                response.text if not response.is_stream_consumed else "",
            )


def test_probes_metrics_and_the_page_stay_open(http: httpx.Client) -> None:
    for path in ("/health", "/ready", "/metrics", "/", "/static/app.js", "/static/auth.js"):
        assert http.get(path).status_code == 200, path
    samples = http.get("/metrics").text
    assert 'status="401"' in samples  # refusals are counted like any response


def test_the_official_client_with_and_without_the_key(server: RemoteServer) -> None:
    keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in keyed.models.list()] == [server.model_name]
    completion = keyed.completions.create(model=server.model_name, prompt="hi", extra_body=FAST, max_tokens=8)
    assert completion.choices[0].finish_reason in ("stop", "length")
    stream = keyed.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stream=True,
        extra_body={"max_denoising_steps": FAST_STEPS},
    )
    assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")
    for wrong in ("x", OTHER_KEY + "x"):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"


def test_cors_preflight_allowed_for_the_listed_origin_and_refused_for_others(http: httpx.Client) -> None:
    asks = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = http.options("/v1/completions", headers={"Origin": ALLOWED, **asks})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers

    refused = http.options("/v1/completions", headers={"Origin": "https://evil.example", **asks})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    wrong_method = http.options(
        "/v1/completions", headers={"Origin": ALLOWED, **asks, "Access-Control-Request-Method": "DELETE"}
    )
    assert wrong_method.status_code == 400

    # The actual request: a refusal carries the header the allowed page needs to read it; others get none.
    response = http.get("/v1/models", headers={"Origin": ALLOWED})
    assert response.status_code == 401 and response.headers["access-control-allow-origin"] == ALLOWED
    foreign = http.get(
        "/v1/models", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"}
    )
    assert "access-control-allow-origin" not in foreign.headers


def oversized_body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "x" * MAX_BODY, **FAST}).encode()


def test_an_oversized_body_is_413_and_the_server_keeps_serving(
    http: httpx.Client, server: RemoteServer
) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = oversized_body(server.model_name)
    declared = http.post("/v1/completions", content=body, headers=auth)
    error = assert_openai_error(declared, 413)
    assert error["code"] == "request_too_large" and f"{MAX_BODY:,} bytes" in error["message"]
    assert "--max-request-body-bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    chunked = http.post("/v1/completions", content=chunks(), headers=auth)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert assert_openai_error(chunked, 413)["code"] == "request_too_large"

    fits = {"model": server.model_name, "prompt": "x" * 100, **FAST}
    assert http.post("/v1/completions", json=fits, headers=auth).status_code == 200
    assert http.get("/ready").status_code == 200
