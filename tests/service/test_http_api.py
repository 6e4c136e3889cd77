"""Plain HTTP against the real server: live canvases, every error status in OpenAI's shape, several
choices, stop strings, echo and seeds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from engine.canvas_end import end_canvas
from tests.service.conftest import FAST_STEPS, RemoteServer, assert_openai_error, sse_payloads

CANVAS = 16
EOS = 1
TOO_LONG_PROMPT = "x" * 500  # 500 tokens of the 512-token context: no room for one canvas


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chunk of a streamed request; asserts the stream ends with exactly one `[DONE]`."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = list(sse_payloads(response.iter_lines()))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    chunks = payloads[:-1]
    assert all(isinstance(chunk, dict) and "error" not in chunk for chunk in chunks), chunks
    return chunks  # type: ignore[return-value]


def complete(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json={"max_denoising_steps": FAST_STEPS, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


# -- live canvases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_canvases_arrive_in_order_and_each_canvas_ends_with_its_committed_tokens(
    http: httpx.Client, tiny_model_dir: Path, n: int
) -> None:
    max_tokens = 3 * CANVAS - 5  # the last canvas is cut at max_tokens (or at EOS)
    chunks = stream(
        http,
        "/v1/completions",
        {
            "prompt": "hello",
            "max_tokens": max_tokens,
            "max_denoising_steps": FAST_STEPS,
            "n": n,
            "seed": 3,
            "stream_options": {"include_canvas": True},
        },
    )
    canvases: dict[int, list[dict[str, Any]]] = defaultdict(list)
    text_of_canvas: dict[int, dict[int, str]] = defaultdict(lambda: defaultdict(str))
    reasons: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        index = choice["index"]
        assert index not in reasons, "a chunk after the finish reason"
        if "canvas" in chunk:
            assert chunk["canvas"]["index"] == index
            assert chunk["canvas"]["request_id"] == chunk["id"]
            assert choice["text"] == "" and choice["finish_reason"] is None
            canvases[index].append(chunk["canvas"])
        elif canvases[index]:
            text_of_canvas[index][canvases[index][-1]["canvas_index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            reasons[index] = choice["finish_reason"]
    assert sorted(reasons) == list(range(n))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for index in range(n):
        order = [(c["canvas_index"], c["step"]) for c in canvases[index]]
        assert order == sorted(order) and len(set(order)) == len(order), order
        assert order[0] == (0, 1)
        last_of_canvas = {c["canvas_index"]: c for c in canvases[index]}  # the later one wins
        assert sorted(last_of_canvas) == list(range(len(last_of_canvas)))
        num_output = 0
        for canvas_index, canvas in sorted(last_of_canvas.items()):
            assert len(canvas["token_ids"]) == CANVAS
            assert canvas["text"] == tokenizer.decode(canvas["token_ids"], skip_special_tokens=False)
            end = end_canvas(canvas["token_ids"], num_output, max_tokens, (EOS,))
            committed = tokenizer.decode(end.new_token_ids, skip_special_tokens=True)
            assert text_of_canvas[index][canvas_index] == committed, (index, canvas_index)
            num_output += len(end.new_token_ids)
            if end.finish_reason is not None:
                assert end.finish_reason == reasons[index]
                assert canvas_index == max(last_of_canvas)


# -- errors ----------------------------------------------------------------------------------------

COMPLETION_ERRORS: list[tuple[str, dict[str, Any], str | None]] = [
    # (case, body, param named in the error, if any)
    ("prompt + max_tokens over max_model_len", {"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ("prompt alone over max_model_len", {"prompt": TOO_LONG_PROMPT}, "prompt"),
    ("prompt + one canvas over max_model_len by 1", {"prompt": "x" * 497, "max_tokens": 16}, "max_tokens"),
    ("prompt of the wrong type", {"prompt": 123}, None),
    ("max_tokens of the wrong type", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("temperature of the wrong type", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("stream of the wrong type", {"prompt": "hi", "stream": "maybe"}, "stream"),
    ("n of the wrong type", {"prompt": "hi", "n": 1.5}, "n"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("max_denoising_steps 0", {"prompt": "hi", "max_denoising_steps": 0}, "max_denoising_steps"),
    ("max_denoising_steps too many", {"prompt": "hi", "max_denoising_steps": 100_000}, None),
    ("entropy_bound -1", {"prompt": "hi", "entropy_bound": -1}, "entropy_bound"),
    ("temperature 99", {"prompt": "hi", "temperature": 99}, "temperature"),
    ("top_p 0.5", {"prompt": "hi", "top_p": 0.5}, None),
    ("top_p 0", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("n 1000", {"prompt": "hi", "n": 1000}, "n"),
    ("n 0", {"prompt": "hi", "n": 0}, "n"),
    ("seed -1", {"prompt": "hi", "seed": -1}, "seed"),
    ("t_max below t_min", {"prompt": "hi", "t_min": 0.5, "t_max": 0.1}, None),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("empty prompt list", {"prompt": []}, "prompt"),
    ("empty token list in a batch", {"prompt": [[]]}, "prompt"),
    ("empty string in a batch", {"prompt": ["hi", ""]}, "prompt"),
    ("out-of-vocab token id", {"prompt": [5, 6, 128]}, "prompt"),
    ("negative token id", {"prompt": [5, -1]}, None),
    ("out-of-vocab id in a batch", {"prompt": [[5], [1000]]}, "prompt"),
    ("out-of-vocab pinned_canvas token", {"prompt": "hi", "pinned_canvas": [500]}, None),
    ("pinned_canvas longer than a canvas", {"prompt": "hi", "pinned_canvas": [5] * 17}, None),
    ("stream_options without stream", {"prompt": "hi", "stream_options": {"include_usage": True}}, None),
    ("logprobs over 20", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("suffix", {"prompt": "hi", "suffix": "end"}, None),
    ("missing prompt", {"max_tokens": 4}, "prompt"),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in COMPLETION_ERRORS], ids=[c[0] for c in COMPLETION_ERRORS]
)
def test_bad_completion_requests_get_400(http: httpx.Client, body: dict[str, Any], param: str | None) -> None:
    error = assert_openai_error(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


FIELD_ERRORS: list[tuple[str, bytes, str, str]] = [
    # (case, raw JSON body, param, a phrase of the message); raw, since JSON has no NaN but Python's parser
    # (and so the server's) reads NaN, Infinity, and 1e999 as inf
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', "temperature", "finite number, got nan"),
    ("infinite t_min", b'{"prompt": "hi", "t_min": Infinity}', "t_min", "finite number, got inf"),
    ("1e999 entropy_bound", b'{"prompt": "hi", "entropy_bound": 1e999}', "entropy_bound", "got inf"),
    ("NaN confidence", b'{"prompt": "hi", "confidence_threshold": NaN}', "confidence_threshold", "got nan"),
    ("NaN top_p", b'{"prompt": "hi", "top_p": NaN}', "top_p", "finite number"),
    ("t_min 0", b'{"prompt": "hi", "t_min": 0}', "t_min", "t_min=0.0 must be > 0"),
    ("t_max below t_min", b'{"prompt": "hi", "t_min": 0.5, "t_max": 0.1}', "t_max", "make t_max >= t_min"),
    ("temperature 99", b'{"prompt": "hi", "temperature": 99}', "temperature", "must be <= 10"),
    ("out-of-vocab id", b'{"prompt": [5, 6, 128]}', "prompt", "outside the vocabulary"),
    (
        "pinned too long",
        b'{"prompt": "hi", "pinned_canvas": [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]}',
        "pinned_canvas",
        "17 positions; the canvas has 16",
    ),
    (
        "65 stop strings",
        b'{"prompt": "hi", "stop": [' + b", ".join([b'"s"'] * 65) + b"]}",
        "stop",
        "at most 64",
    ),
    (
        "a 257-character stop",
        b'{"prompt": "hi", "stop": "' + b"s" * 257 + b'"}',
        "stop",
        "at most 256 characters",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "phrase"), [c[1:] for c in FIELD_ERRORS], ids=[c[0] for c in FIELD_ERRORS]
)
def test_bad_field_values_get_400_naming_the_field(
    http: httpx.Client, body: bytes, param: str, phrase: str
) -> None:
    headers = {"content-type": "application/json"}
    error = assert_openai_error(http.post("/v1/completions", content=body, headers=headers), 400)
    assert error["param"] == param, error
    assert phrase in error["message"], error


def test_64_stop_strings_are_accepted(http: httpx.Client) -> None:
    stops = [f"never-{i}" for i in range(63)] + ["s" * 256]
    assert complete(http, prompt="hi", max_tokens=4, stop=stops)["choices"]


CHAT_ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("no messages", {"messages": []}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("content of the wrong type", {"messages": [{"role": "user", "content": 5}]}),
    ("messages over max_model_len", {"messages": [{"role": "user", "content": TOO_LONG_PROMPT}]}),
    (
        "max_completion_tokens over max_model_len",
        {"messages": [{"role": "user"}], "max_completion_tokens": 999},
    ),
    ("stream_options without stream", {"messages": [{"role": "user"}], "stream_options": {}}),
    (
        "top_logprobs over 20",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
    ),
]


@pytest.mark.parametrize("body", [c[1] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS])
def test_bad_chat_requests_get_400(http: httpx.Client, body: dict[str, Any]) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"a string"'])
def test_malformed_json_gets_400(http: httpx.Client, path: str, body: bytes) -> None:
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_gets_404(http: httpx.Client, path: str, server: RemoteServer) -> None:
    body = {"model": "gpt-17", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    error = assert_openai_error(http.post(path, json=body), 404)
    assert error["type"] == "not_found_error" and error["param"] == "model"
    assert "gpt-17" in error["message"] and server.model_name in error["message"]


def test_unknown_routes_and_methods_get_openai_errors(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nowhere"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_the_context_limit_message_says_what_to_change(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 600}), 400)
    assert "maximum context length is 512" in error["message"]
    assert "lower max_tokens" in error["message"]


def test_the_longest_prompt_that_fits_is_served(http: httpx.Client) -> None:
    body = complete(http, prompt="x" * (512 - CANVAS), max_tokens=CANVAS)
    assert body["usage"]["prompt_tokens"] == 512 - CANVAS


# -- choices, stop strings, echo, seeds ------------------------------------------------------------


def test_n_2_with_two_prompts_gives_four_choices(http: httpx.Client) -> None:
    body = complete(http, prompt=["hello", "bye"], n=2, max_tokens=8, seed=1)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == len("hello") + len("bye")
    assert body["usage"]["canvases"] == 4


def test_two_prompts_give_two_choices_each_from_its_prompt(http: httpx.Client) -> None:
    body = complete(http, prompt=["hello", "bye"], max_tokens=8, seed=1, echo=True)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"].startswith("hello")
    assert body["choices"][1]["text"].startswith("bye")
    assert body["usage"]["prompt_tokens"] == 8


def test_two_token_id_prompts(http: httpx.Client) -> None:
    body = complete(http, prompt=[[40, 41, 42], [43]], max_tokens=8, seed=1, echo=True)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"].startswith("CDE")  # ids 5.. are printable ASCII from " "
    assert body["choices"][1]["text"].startswith("F")
    assert body["usage"]["prompt_tokens"] == 4


def test_streamed_n_2_gives_both_indices_each_finishing_once(http: httpx.Client) -> None:
    chunks = stream(
        http,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 20, "max_denoising_steps": 2},
    )
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(roles) == [0, 1]
    assert sorted(finishes) == [0, 1]


def seeded_text(http: httpx.Client, **body: Any) -> tuple[str, str]:
    (choice,) = complete(http, prompt="hello", max_tokens=2 * CANVAS, **body)["choices"]
    return choice["text"], choice["finish_reason"]


def test_a_seed_reproduces_the_output(http: httpx.Client) -> None:
    first, second = seeded_text(http, seed=1234), seeded_text(http, seed=1234)
    assert first == second
    others = {seeded_text(http, seed=s)[0] for s in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds should not all give the same text"


def test_a_stop_string_cuts_the_text_with_finish_reason_stop(http: httpx.Client) -> None:
    for seed in range(20):  # a seed whose output is long enough to hold a stop string mid-text
        text, _ = seeded_text(http, seed=seed)
        if len(text) >= 12:
            break
    else:
        pytest.fail("no seed gave 12 characters of output")
    stop = text[8:10]
    cut_text, reason = seeded_text(http, seed=seed, stop=["never-appears", stop])
    assert reason == "stop"
    assert cut_text == text[: text.index(stop)]


def test_stop_strings_in_a_stream(http: httpx.Client) -> None:
    text, _ = seeded_text(http, seed=7)
    if len(text) < 4:
        pytest.skip("seed 7 gave too short an output")
    stop = text[2:4]
    chunks = stream(
        http,
        "/v1/completions",
        {"prompt": "hello", "max_tokens": 2 * CANVAS, "seed": 7, "stop": stop, "max_denoising_steps": 4},
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_stop_string_ended_request_reports_its_real_denoise_steps_and_canvases(http: httpx.Client) -> None:
    """The stop string lies in the first canvas: usage is that canvas's, as in a one-canvas request."""
    for seed in range(20):
        one_canvas = complete(http, prompt="hello", max_tokens=CANVAS, seed=seed)
        if len(one_canvas["choices"][0]["text"]) >= 4:
            break
    else:
        pytest.fail("no seed gave 4 characters of output in one canvas")
    stop = one_canvas["choices"][0]["text"][2:4]
    for streamed in (False, True):
        body = {"prompt": "hello", "max_tokens": 2 * CANVAS, "seed": seed, "stop": [stop]}
        if streamed:
            body |= {"max_denoising_steps": FAST_STEPS, "stream_options": {"include_usage": True}}
            usage = stream(http, "/v1/completions", body)[-1]["usage"]
        else:
            stopped = complete(http, **body)
            assert stopped["choices"][0]["finish_reason"] == "stop"
            usage = stopped["usage"]
        expected = one_canvas["usage"]
        assert usage["canvases"] == expected["canvases"] == 1, usage
        assert usage["denoise_steps"] == expected["denoise_steps"] >= 1, usage
        assert usage["completion_tokens"] == expected["completion_tokens"], usage


def test_echo_prepends_the_prompt(http: httpx.Client) -> None:
    plain, _ = seeded_text(http, seed=5)
    (choice,) = complete(http, prompt="hello", max_tokens=2 * CANVAS, seed=5, echo=True)["choices"]
    assert choice["text"] == "hello" + plain


def test_engine_side_400s_keep_the_connection_and_log_no_traceback(
    http: httpx.Client, server: RemoteServer
) -> None:
    """Errors raised past the route (InvalidParams from the engine) are answered like any 400: the
    keep-alive connection stays usable and the server logs no "Exception in ASGI application"."""
    for _ in range(3):
        response = http.post("/v1/completions", json={"prompt": "hi", "pinned_canvas": [500]})
        assert_openai_error(response, 400)
    complete(http, prompt="hi", max_tokens=4)
    assert "Exception in ASGI application" not in server.log_path.read_text()
