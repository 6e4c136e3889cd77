"""Prefix caching on the tiny real model: the same tokens with caching on and off (same seeds), hits
counted in usage and stats, under preemption, aborts and eviction pressure."""

from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import RequestOutput, SamplingParams
from tests.engine.checkpoints import CANVAS, save_servable

SHARED = [2] + [5 + (j * 11) % 90 for j in range(45)]
"""A 46-token system prompt that many requests share."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return load_checkpoint(save_servable(tmp_path_factory.mktemp("tiny"), seed=4))


def make_engine(checkpoint: Checkpoint, caching: bool, **config: int) -> Engine:
    config.setdefault("block_size", 4)
    engine_config = EngineConfig(**config, enable_prefix_caching=caching)  # type: ignore[arg-type]
    return Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, engine_config)


def params(seed: int, max_tokens: int = 2 * CANVAS, steps: int = 3) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, max_denoising_steps=steps, seed=seed, stop_token_ids=())


def question(i: int) -> list[int]:
    return [7 + (i * 13 + j) % 80 for j in range(2 + i % 5)]


def test_shared_prompt_hits_and_keeps_outputs(checkpoint: Checkpoint) -> None:
    prompts = [SHARED + question(i) for i in range(6)]
    results = {}
    for caching in (False, True):
        engine = make_engine(checkpoint, caching)
        llm = LLM(engine)
        first = llm.generate(prompts[:1], [params(0)])  # fills the cache
        rest = llm.generate(prompts[1:], [params(i) for i in range(1, 6)])
        results[caching] = [r.token_ids for r in first + rest]
        usages = [r.usage for r in first + rest]
        assert all(u is not None for u in usages)
        cached = [u.cached_tokens for u in usages if u is not None]
        stats = engine.stats
        if caching:
            assert cached == [0] + [44] * 5  # 46 shared tokens: 11 whole blocks of 4
            assert stats.num_prefix_cache_hits == 5 * 44
            assert stats.num_prefix_cache_queries == sum(len(p) for p in prompts)
            assert stats.num_prefill_tokens == sum(len(p) for p in prompts) - 5 * 44
        else:
            assert cached == [0] * 6 and stats.num_prefix_cache_queries == 0
        assert engine.scheduler.kv.usage() == 0.0
    assert results[True] == results[False]


def test_next_turn_hits_prompt_and_committed_canvases(checkpoint: Checkpoint) -> None:
    turn1 = SHARED + question(1)  # 49 tokens
    outputs: dict[bool, list[list[int]]] = {}
    for caching in (False, True):
        llm = LLM(make_engine(checkpoint, caching))
        (first,) = llm.generate([turn1], [params(1, max_tokens=3 * CANVAS)])
        turn2 = turn1 + first.token_ids[: 2 * CANVAS] + question(2)  # the answer's first two canvases
        (second,) = llm.generate([turn2], [params(2)])
        assert second.usage is not None
        # the cache holds the prompt and canvases 0 and 1 (the last one too, which turn2 does not repeat)
        expected = (len(turn1) + 2 * CANVAS) // 4 * 4 if caching else 0
        assert second.usage.cached_tokens == expected
        outputs[caching] = [first.token_ids, second.token_ids]
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("cache_final_canvas", [True, False])
def test_next_turn_hits_the_whole_answer(checkpoint: Checkpoint, cache_final_canvas: bool) -> None:
    turn1 = SHARED + question(1)  # 49 tokens
    outputs: dict[bool, list[list[int]]] = {}
    for caching in (False, True):
        engine = make_engine(checkpoint, caching, cache_final_canvas=cache_final_canvas)
        llm = LLM(engine)
        (first,) = llm.generate([turn1], [params(1, max_tokens=3 * CANVAS)])
        assert len(first.token_ids) == 3 * CANVAS  # no stop ids: the last canvas is output whole
        turn2 = turn1 + first.token_ids + question(2)
        (second,) = llm.generate([turn2], [params(2)])
        assert second.usage is not None
        answered = len(turn1) + 3 * CANVAS  # 97 tokens: 24 whole blocks
        expected = answered // 4 * 4 if cache_final_canvas else (len(turn1) + 2 * CANVAS) // 4 * 4
        assert second.usage.cached_tokens == (expected if caching else 0)
        # each turn's tail: from its last commit to the last whole block of its answer
        answered2 = len(turn2) + 2 * CANVAS
        tails = [answered // 4 * 4 - (answered - CANVAS), answered2 // 4 * 4 - (answered2 - CANVAS)]
        assert engine.stats.num_cache_tail_tokens == (sum(tails) if caching and cache_final_canvas else 0)
        outputs[caching] = [first.token_ids, second.token_ids]
    assert outputs[True] == outputs[False]


def drive(engine: Engine, aborts: dict[str, int]) -> dict[str, list[int]]:
    """Run 8 requests (a shared prompt, arriving two per step) to the end, aborting `aborts[id]` steps
    after arrival; returns the tokens of every request that was not aborted."""
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    for step in range(10_000):
        if step < 4:
            for i in (2 * step, 2 * step + 1):
                prompt = SHARED + question(i)
                engine.add_request(f"r{i}", prompt, params(i, max_tokens=2 * CANVAS, steps=2))
        for request_id, after in aborts.items():
            if step == after:
                engine.abort(request_id)
        outputs: list[RequestOutput] = engine.step() if engine.has_unfinished() else []
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                finished.add(output.request_id)
        if step >= 4 and not engine.has_unfinished():
            break
    assert engine.scheduler.kv.usage() == 0.0, "every block is free or cached with count 0"
    return {i: t for i, t in tokens.items() if i not in aborts and i in finished}


@pytest.mark.parametrize("num_full_blocks", [24, None])
def test_outputs_match_under_preemption_aborts_and_eviction(
    checkpoint: Checkpoint, num_full_blocks: int | None
) -> None:
    aborts = {"r1": 2, "r4": 3}
    config = dict(max_num_seqs=4, max_num_batched_tokens=4 * CANVAS + 32)
    reference = drive(make_engine(checkpoint, False, **config), aborts)
    if num_full_blocks is not None:
        config["num_full_blocks"] = num_full_blocks  # one request needs up to 17 blocks of 4
    engine = make_engine(checkpoint, True, **config)
    assert drive(engine, aborts) == reference
    assert len(reference) == 6
    assert engine.stats.num_prefix_cache_hits > 0
    if num_full_blocks == 24:
        assert engine.stats.num_preemptions > 0


def test_reset_prefix_cache(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, True)
    llm = LLM(engine)
    llm.generate([SHARED + question(0)], [params(0)])
    assert engine.reset_prefix_cache()
    (after,) = llm.generate([SHARED + question(1)], [params(1)])
    assert after.usage is not None and after.usage.cached_tokens == 0
    assert not make_engine(checkpoint, False).reset_prefix_cache()


def drive_chat(engine: Engine, cut: tuple[int, int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """3 conversations of 3 turns side by side: each turn sends the previous turn's prompt, its answer
    and a new question, one step after the answer ended (a client's round trip). Turn `cut` =
    (conversation, turn) is aborted as soon as its first canvas is out, as a client stopping at a stop
    string does, and its conversation goes on from that canvas. Returns every turn's output and the
    cached tokens of every turn that finished."""
    histories = {c: SHARED + question(c) for c in range(3)}
    turns = dict.fromkeys(range(3), 0)
    in_flight: dict[str, int] = {}
    due: dict[int, int] = dict.fromkeys(range(3), 0)
    """Conversation -> the step at which its next turn is sent."""
    answers: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for step in range(10_000):
        for c in [c for c, at in due.items() if at == step]:
            request_id = f"c{c}t{turns[c]}"
            max_tokens = 3 * CANVAS if (c, turns[c]) == cut else 2 * CANVAS
            engine.add_request(request_id, histories[c], params(10 * c + turns[c], max_tokens, steps=2))
            in_flight[request_id] = c
            del due[c]
        if not engine.has_unfinished() and not due:
            break
        for output in engine.step() if engine.has_unfinished() else []:
            c = in_flight[output.request_id]
            answers.setdefault(output.request_id, []).extend(output.new_token_ids)
            stop_here = (c, turns[c]) == cut and not output.finished
            if stop_here:
                engine.abort(output.request_id)
            if output.finished and output.usage is not None:
                cached[output.request_id] = output.usage.cached_tokens
            if output.finished or stop_here:
                del in_flight[output.request_id]
                histories[c] = histories[c] + answers[output.request_id] + question(20 + 3 * c + turns[c])
                turns[c] += 1
                if turns[c] < 3:
                    due[c] = step + 2
    assert not in_flight and engine.scheduler.kv.usage() == 0.0, "every block is free or cached with count 0"
    return answers, cached


@pytest.mark.parametrize("num_full_blocks", [48, None])
def test_conversations_hit_their_answers_and_keep_outputs(
    checkpoint: Checkpoint, num_full_blocks: int | None
) -> None:
    config = dict(max_num_seqs=3, max_num_batched_tokens=3 * CANVAS + 32)
    reference, _ = drive_chat(make_engine(checkpoint, False, **config), cut=(1, 0))
    if num_full_blocks is not None:
        config["num_full_blocks"] = num_full_blocks  # a third turn needs up to 44 blocks of 4
    engine = make_engine(checkpoint, True, **config)
    answers, cached = drive_chat(engine, cut=(1, 0))
    assert answers == reference and len(answers) == 9
    assert engine.stats.num_cache_tail_tokens > 0
    if num_full_blocks is None:  # no eviction: every later turn hits up to the end of the answer before
        for c in range(3):
            history = SHARED + question(c)
            for t in range(1, 3):
                history_end = len(history) + len(answers[f"c{c}t{t - 1}"])
                assert cached[f"c{c}t{t}"] == history_end // 4 * 4, (c, t)
                history = history + answers[f"c{c}t{t - 1}"] + question(20 + 3 * c + t - 1)
    else:
        assert engine.stats.num_preemptions > 0
