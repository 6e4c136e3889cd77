"""The official `openai` package against the real server: completions and chat, whole and streamed,
usage (with our extension fields), and live canvases that ordinary client loops survive."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.service.conftest import FAST_STEPS, RemoteServer

FAST = {"max_denoising_steps": FAST_STEPS}
MESSAGES: list[Any] = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


def check_usage(usage: Any, prompt_tokens: int | None = None, max_completion: int | None = None) -> None:
    assert usage is not None
    if prompt_tokens is not None:
        assert usage.prompt_tokens == prompt_tokens
    assert usage.prompt_tokens > 0
    if max_completion is not None:
        assert 0 <= usage.completion_tokens <= max_completion
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = usage.model_extra
    assert extra["canvases"] >= 1
    assert extra["canvases"] <= extra["denoise_steps"] <= FAST_STEPS * extra["canvases"]


def test_models_lists_the_served_model(client: openai.OpenAI, server: RemoteServer) -> None:
    assert [model.id for model in client.models.list()] == [server.model_name]


def test_completion(client: openai.OpenAI, server: RemoteServer) -> None:
    response = client.completions.create(
        model=server.model_name, prompt="hello", max_tokens=20, extra_body=FAST
    )
    assert response.object == "text_completion"
    assert response.model == server.model_name
    (choice,) = response.choices
    assert choice.index == 0
    assert isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    check_usage(response.usage, prompt_tokens=5, max_completion=20)
    if choice.finish_reason == "length":
        assert response.usage is not None and response.usage.completion_tokens == 20


def test_streamed_completion_with_usage(client: openai.OpenAI, server: RemoteServer) -> None:
    stream = client.completions.create(
        model=server.model_name,
        prompt="hello",
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FAST,
    )
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    check_usage(usage_chunk.usage, prompt_tokens=5, max_completion=40)
    assert all(len(chunk.choices) == 1 and chunk.usage is None for chunk in text_chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    reasons = [chunk.choices[0].finish_reason for chunk in text_chunks]
    assert reasons[-1] in ("stop", "length")
    assert all(reason is None for reason in reasons[:-1])


def test_streamed_completion_without_usage_has_no_usage_chunk(
    client: openai.OpenAI, server: RemoteServer
) -> None:
    stream = client.completions.create(
        model=server.model_name, prompt="hello", max_tokens=16, stream=True, extra_body=FAST
    )
    chunks = list(stream)
    assert chunks and all(len(chunk.choices) == 1 and chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat(client: openai.OpenAI, server: RemoteServer) -> None:
    response = client.chat.completions.create(
        model=server.model_name, messages=MESSAGES, max_tokens=20, extra_body=FAST
    )
    assert response.object == "chat.completion"
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    check_usage(response.usage, max_completion=20)


def test_streamed_chat_with_usage(client: openai.OpenAI, server: RemoteServer) -> None:
    stream = client.chat.completions.create(
        model=server.model_name,
        messages=MESSAGES,
        max_completion_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FAST,
    )
    chunks = list(stream)
    first, *middle, usage_chunk = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert usage_chunk.choices == []
    check_usage(usage_chunk.usage, max_completion=40)
    assert middle[-1].choices[0].finish_reason in ("stop", "length")
    content = "".join(chunk.choices[0].delta.content or "" for chunk in middle)
    assert usage_chunk.usage is not None
    if usage_chunk.usage.completion_tokens and middle[-1].choices[0].finish_reason == "length":
        assert content


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_an_ordinary_loop_survives_live_canvases(
    client: openai.OpenAI, server: RemoteServer, endpoint: str
) -> None:
    """Canvas chunks are ordinary chunks: the usual loop reads text from them (empty) without crashing;
    the canvases themselves are in `model_extra["canvas"]`."""
    options: Any = {"include_usage": True, "include_canvas": True}
    common: dict[str, Any] = dict(
        model=server.model_name, stream=True, stream_options=options, max_tokens=32, extra_body=FAST
    )
    if endpoint == "chat":
        stream: Any = client.chat.completions.create(messages=MESSAGES, **common)
    else:
        stream = client.completions.create(prompt="hello", **common)
    text, canvases, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        assert chunk.choices is not None and len(chunk.choices) == 1
        choice = chunk.choices[0]
        text += (choice.delta.content if endpoint == "chat" else choice.text) or ""
        canvas = (chunk.model_extra or {}).get("canvas")
        if canvas is not None:
            canvases.append(canvas)
            assert choice.finish_reason is None
            assert (choice.delta.content if endpoint == "chat" else choice.text) in ("", None)
    assert usage is not None and canvases
    assert len(canvases) == usage.model_extra["denoise_steps"]
    assert {c["canvas_index"] for c in canvases} == set(range(usage.model_extra["canvases"]))
    for canvas in canvases:
        assert len(canvas["token_ids"]) == 16
        assert len(canvas["confidence"]) == 16
        assert 1 <= canvas["step"] <= FAST_STEPS
        assert canvas["index"] == 0
