"""Access control in-process (the app on a tiny model, no engine loop): every route but the open list
needs the key, whatever routes the app grows; the settings and flags behind keys, CORS and TLS."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.cli import build_parser, settings_from
from service.model_setup import build_service
from service.security import OPEN_PATHS, ApiKeyMiddleware, is_open
from service.settings import MAX_REQUEST_BODY_BYTES, Settings
from tests.engine.checkpoints import save_servable
from tests.service.conftest import assert_openai_error

KEYS = ["first-key", "second-key"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_servable(tmp_path_factory.mktemp("checkpoint") / "tiny")


def build_app(model_dir: Path, **settings: object) -> FastAPI:
    # The engine in a thread (never started here): no engine process is spawned for a header check.
    options = {"engine_process": False, **settings}
    service, metrics = build_service(Settings(model=model_dir, device="cpu", **options))  # type: ignore[arg-type]
    return create_app(service, metrics)


@pytest.fixture(scope="module")
def keyed(model_dir: Path) -> Iterator[TestClient]:
    """No `with`: the lifespan (the engine loop) never starts, so nothing here reaches the engine."""
    yield TestClient(build_app(model_dir, api_key=KEYS))


def every_request(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every operation in the app's OpenAPI schema (path parameters filled in), the
    docs, the page and a static file."""
    requests = [("GET", "/"), ("GET", "/static/style.css"), ("GET", "/docs"), ("GET", "/openapi.json")]
    for path, operations in app.openapi()["paths"].items():
        filled = re.sub(r"{[^}]*}", "x", path)
        requests += [(method.upper(), filled) for method in operations]
    return requests


def test_every_route_but_the_open_ones_needs_a_key(keyed: TestClient) -> None:
    requests = every_request(keyed.app)  # type: ignore[arg-type]
    protected = [(m, p) for m, p in requests if not is_open(p)]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/engine/events"} <= {
        p for _, p in protected
    }
    for method, path in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
            response = keyed.request(method, path, headers=headers)
            error = assert_openai_error(response, 401)
            assert error["code"] == "invalid_api_key", (method, path)
            assert response.headers["WWW-Authenticate"] == "Bearer"
        missing = assert_openai_error(keyed.request(method, path), 401)
        assert "Authorization: Bearer" in missing["message"]
    opened = [(m, p) for m, p in requests if is_open(p)]
    assert {p for _, p in opened} >= OPEN_PATHS
    for method, path in opened:  # (/ready is 503 here: the engine loop is not started)
        assert keyed.request(method, path).status_code in (200, 503), path


def test_a_configured_key_passes_and_unknown_paths_are_refused_too(keyed: TestClient) -> None:
    for key in KEYS:
        response = keyed.get("/v1/models", headers={"Authorization": f"bearer {key}"})
        assert response.status_code == 200, response.text
    assert keyed.get("/v1/no-such-route").status_code == 401  # new routes are protected by default
    assert keyed.get("/v1/no-such-route", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 404
    assert keyed.get("/static/../v1/models").status_code != 200
    assert keyed.get("/docs").status_code == 401


def test_the_key_check_compares_with_every_key() -> None:
    check = ApiKeyMiddleware(FastAPI(), keys=KEYS)
    assert check.is_accepted("Bearer first-key") and check.is_accepted("Bearer second-key")
    assert check.is_accepted("BEARER second-key")
    for header in (None, "", "Bearer", "Bearer ", "Bearer first-ke", "Token first-key", "first-key"):
        assert not check.is_accepted(header), header
    with pytest.raises(ValueError, match="at least one key"):
        ApiKeyMiddleware(FastAPI(), keys=[])


def test_without_keys_or_origins_everything_is_open_and_same_origin(model_dir: Path) -> None:
    client = TestClient(build_app(model_dir))
    assert client.get("/v1/models").status_code == 200
    response = client.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/v1/completions",
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


# -- settings and flags -------------------------------------------------------------------------------


def parsed(*flags: str) -> Settings:
    return settings_from(build_parser().parse_args(["serve", *flags]))


def keys_of(settings: Settings) -> list[str]:
    return settings.api_keys()


def test_keys_from_flags_then_canvas_serve_then_vllm_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CANVAS_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert keys_of(parsed()) == []
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert keys_of(parsed()) == ["from-vllm"]
    monkeypatch.setenv("CANVAS_SERVE_API_KEY", "from-canvas")
    assert keys_of(parsed()) == ["from-canvas"]
    assert keys_of(parsed("--api-key", "a", "--api-key", "b")) == ["a", "b"]
    assert parsed("--api-key", "a", "/some/model").model == Path("/some/model")  # not taken as a key
    key_file = tmp_path / "keys"
    key_file.write_text("one\n\n  two  \n")
    assert keys_of(parsed("--api-key", "a", "--api-key-file", str(key_file))) == ["a", "one", "two"]
    key_file.write_text("\n  \n")
    with pytest.raises(ValidationError, match="holds no key"):
        parsed("--api-key-file", str(key_file))
    monkeypatch.setenv("CANVAS_SERVE_API_KEY", "")
    assert keys_of(parsed()) == []  # set but empty: no key, as vLLM treats an empty VLLM_API_KEY
    assert "from-canvas" not in repr(Settings(api_key=["from-canvas"]))  # never printed


def test_cors_flags_take_words_or_vllm_json_and_refuse_wildcard_with_credentials() -> None:
    assert parsed().allowed_origins == []
    both = '["https://a.example", "https://b.example"]'
    settings = parsed("--allowed-origins", both, "--allow-credentials")
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.allow_credentials is True
    repeated = parsed("--allowed-origins", "https://a.example", "--allowed-origins", "https://c.example")
    assert repeated.allowed_origins == ["https://a.example", "https://c.example"]
    assert parsed("--allowed-methods", "GET", "--allowed-methods", "POST").allowed_methods == ["GET", "POST"]
    with pytest.raises(ValidationError, match="list the origins that may call the API"):
        parsed("--allowed-origins", "*", "--allow-credentials")
    assert parsed("--allowed-origins", "*").allowed_origins == ["*"]  # any origin, without credentials


def test_tls_and_root_path_are_checked_before_the_model_loads(tmp_path: Path) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_text("not read here")
    with pytest.raises(ValidationError, match="both --ssl-keyfile and --ssl-certfile"):
        parsed("--ssl-certfile", str(pem))
    with pytest.raises(ValidationError, match="no such file"):
        parsed("--ssl-certfile", str(pem), "--ssl-keyfile", str(tmp_path / "missing.pem"))
    with pytest.raises(ValidationError, match="give --ssl-ca-certs"):
        parsed("--ssl-cert-reqs", "2")
    with pytest.raises(ValidationError, match="as /prefix"):
        parsed("--root-path", "canvas/")
    assert parsed("--root-path", "/canvas").root_path == "/canvas"


def test_the_body_limit_defaults_to_a_few_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parsed().max_request_body_bytes == MAX_REQUEST_BODY_BYTES == 8 * 1024**2
    assert parsed("--max-request-body-bytes", "1000").max_request_body_bytes == 1000
    monkeypatch.setenv("CANVAS_SERVE_MAX_REQUEST_BODY_BYTES", "2000")
    assert parsed().max_request_body_bytes == 2000
