"""Choices on the engine: stop strings found across commits, and the usage of a choice they end."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import Engine, EngineConfig
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import SamplingParams
from service.choices import ChoiceEvent, ChoiceRun, ChoiceSpec, StopMatcher
from tests.engine.byte_fallback_tokenizer import byte_fallback_tokenizer
from tests.engine.checkpoints import CANVAS, save_servable


def test_a_stop_string_split_over_two_deltas_is_found_and_nothing_after_it_emitted() -> None:
    matcher = StopMatcher(["END", "x"])
    assert matcher.feed("abcEN") == ("abc", False)  # "EN" may begin "END": held back
    assert matcher.feed("Dafter") == ("", True)


def test_held_back_text_is_emitted_once_it_cannot_begin_a_stop_string() -> None:
    matcher = StopMatcher(["STOP"])
    emitted = [matcher.feed(d)[0] for d in ("hello S", "T", "ART", " more")]
    assert "".join(emitted) + matcher.flush() == "hello START more"
    assert StopMatcher([]).feed("all of it") == ("all of it", False)


def test_the_earliest_stop_string_wins_across_deltas() -> None:
    matcher = StopMatcher(["later", "ab"])
    assert matcher.feed("xxxxxla") == ("xxx", False)  # 4 characters held: "later" has 5
    assert matcher.feed("ter ab") == ("xx", True)


@pytest.mark.parametrize("stop", ["snow 雪", "❄ s", "world", "雪"])
def test_a_stop_string_spanning_two_commits_cuts_the_detokenized_text_where_a_full_decode_does(
    stop: str,
) -> None:
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer("hello world, the ❄ snow 雪 and more snow", add_special_tokens=False).input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, len(ids)):  # every commit boundary, inside the stop string's tokens too
        detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(["never", stop])
        out, hit = matcher.feed(detok.push(ids[:cut]))
        if not hit:
            rest, hit = matcher.feed(detok.push(ids[cut:], is_last=True))
            out += rest
        assert hit and out == full[: full.index(stop)], cut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return load_checkpoint(save_servable(tmp_path_factory.mktemp("tiny"), seed=4))


def test_a_choice_ended_by_a_stop_string_reports_the_denoise_steps_and_canvases_until_then(
    checkpoint: Checkpoint,
) -> None:
    def engine() -> Engine:
        return Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, EngineConfig())

    params = SamplingParams(max_tokens=3 * CANVAS, max_denoising_steps=3, seed=11, stop_token_ids=())
    prompt = [2, 7, 8, 9]
    (full,) = LLM(engine()).generate([prompt], [params])
    first_canvas = checkpoint.tokenizer.decode(full.token_ids[:CANVAS], skip_special_tokens=True)
    second_canvas = checkpoint.tokenizer.decode(full.token_ids[: 2 * CANVAS], skip_special_tokens=True)
    assert len(second_canvas) > len(first_canvas) + 2, "the tiny model should write text in each canvas"
    stop = second_canvas[len(first_canvas) : len(first_canvas) + 2]  # in the second canvas
    assert stop not in first_canvas or pytest.skip("this stop string already occurs in the first canvas")

    async def run() -> list[ChoiceEvent]:
        async_engine = AsyncEngine(engine())
        async_engine.start()
        try:
            stream = await async_engine.submit(prompt, params, "r")
            choice = ChoiceRun(ChoiceSpec(0, prompt, params), stream, None, StopMatcher([stop]), 0.0, "r")
            return [event async for event in choice.events()]
        finally:
            async_engine.shutdown()

    events = asyncio.run(run())
    last = events[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert "".join(e.text for e in events) == second_canvas[: second_canvas.index(stop)]
    assert last.usage.canvases == 2
    assert last.usage.steps_per_canvas == tuple(full.steps_per_canvas[:2])
    assert last.usage.denoise_steps == sum(full.steps_per_canvas[:2]) > 0
    assert last.usage.completion_tokens == 2 * CANVAS
