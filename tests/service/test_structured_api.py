"""Structured outputs and logprobs through the official `openai` client and plain HTTP.

The tiny model is random: whatever it outputs under a constraint is valid only because of the grammar.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.service.conftest import FAST_STEPS, RemoteServer, assert_openai_error, sse_payloads

FAST = {"max_denoising_steps": FAST_STEPS}
MESSAGES: list[Any] = [{"role": "user", "content": "give me a pet"}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> httpx.Client:
    return server.http()


def test_chat_parse_with_a_pydantic_model(client: openai.OpenAI, server: RemoteServer) -> None:
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=server.model_name,
            messages=MESSAGES,
            response_format=Pet,
            max_completion_tokens=128,
            seed=seed,
            extra_body=FAST,
        )
        (choice,) = completion.choices
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)


def test_json_object_and_structured_outputs(client: openai.OpenAI, server: RemoteServer) -> None:
    response = client.completions.create(
        model=server.model_name,
        prompt="digits",
        max_tokens=64,
        extra_body={**FAST, "structured_outputs": {"regex": "[0-9]{6}"}},
    )
    assert re.fullmatch("[0-9]{6}", response.choices[0].text) and response.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=server.model_name,
        messages=MESSAGES,
        max_tokens=64,
        extra_body={**FAST, "structured_outputs": {"choice": ["up", "down"]}},
    )
    assert chat.choices[0].message.content in ("up", "down")


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI, server: RemoteServer) -> None:
    kwargs: dict[str, Any] = dict(
        model=server.model_name, messages=MESSAGES, max_tokens=20, seed=3, logprobs=True, top_logprobs=3
    )
    whole = client.chat.completions.create(**kwargs, extra_body=FAST)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == whole.choices[0].message.content
    for token in logprobs.content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True) and token.top_logprobs[0].token == token.token
        assert math.isclose(values[0], token.logprob)
        assert token.bytes == list(token.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body=FAST):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in logprobs.content]


def test_completion_logprobs_whole_and_streamed(http: httpx.Client) -> None:
    body = {"prompt": "hi", "max_tokens": 20, "seed": 5, "logprobs": 2, **FAST}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = whole["logprobs"]
    assert "".join(logprobs["tokens"]) == whole["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    for token, lp, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert math.isclose(top[token], lp) and max(top.values()) == top[token]
    lines = http.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
    tokens = []
    for payload in sse_payloads(iter(lines)):
        if isinstance(payload, dict) and payload["choices"] and payload["choices"][0]["logprobs"]:
            tokens += payload["choices"][0]["logprobs"]["tokens"]
    assert tokens == logprobs["tokens"]


BAD = [
    (
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
        "'not' \\(negation\\) at #",
    ),
    ("/v1/completions", {"structured_outputs": {"regex": "[a-"}}, "regex could not be compiled"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
    (
        "/v1/completions",
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "either response_format or structured_outputs",
    ),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs=true"),
]


@pytest.mark.parametrize(("path", "extra", "message"), BAD)
def test_unsupported_constraints_get_a_400_naming_them(
    http: httpx.Client, path: str, extra: dict[str, Any], message: str
) -> None:
    body = {"prompt": "hi", "messages": MESSAGES, **extra}
    error = assert_openai_error(http.post(path, json=body), 400)
    assert re.search(message, error["message"]), error


def test_json_schema_response_format_over_http(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["n"],
    }
    body = {
        "messages": MESSAGES,
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": schema, "strict": True},
        },
        **FAST,
    }
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert 1 <= json.loads(content)["n"] <= 9


def canvases_of(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    lines = http.post("/v1/completions", json=body).text.splitlines()
    return [p["canvas"] for p in sse_payloads(iter(lines)) if isinstance(p, dict) and "canvas" in p]


def test_canvas_chunks_name_the_pinned_skeleton(http: httpx.Client) -> None:
    """A schema with fixed keys has its forced skeleton pinned from the first step (the char-level
    tokenizer: one position per character of `{"n": `); the canvas extension lists those positions,
    an ordinary chunk field. An unconstrained canvas lists none."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    stream = {"stream": True, "stream_options": {"include_canvas": True}}
    body: dict[str, Any] = {"prompt": "n", "max_tokens": 32, "seed": 1, **stream, **FAST}
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    first = [
        c for c in canvases_of(http, {**body, "response_format": response_format}) if c["canvas_index"] == 0
    ]
    assert first
    for canvas in first:
        assert canvas["pinned"] == list(range(6)) and canvas["text"].startswith('{"n": '), canvas
    plain = canvases_of(http, body)
    assert plain and all(c["pinned"] == [] for c in plain)
