"""The engine on a tiny real model: batch independence, async streaming, aborts, failures, stats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from engine.async_engine import AsyncEngine, EngineDead
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import InvalidParams, RequestOutput, SamplingParams
from engine.scheduler import QueueFull
from tests.engine.checkpoints import CANVAS, save_servable


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = tmp_path_factory.mktemp("tiny")
    return load_checkpoint(save_servable(path, seed=4))


def make_engine(checkpoint: Checkpoint, **config: int) -> Engine:
    return Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, EngineConfig(**config))


def params(seed: int, max_tokens: int = 2 * CANVAS, steps: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, max_denoising_steps=steps, seed=seed, stop_token_ids=())


def prompt(i: int) -> list[int]:
    return [2] + [5 + (i * 7 + j) % 90 for j in range(3 + i % 11)]


def test_outputs_are_identical_alone_and_among_16_concurrent_requests(checkpoint: Checkpoint) -> None:
    config = dict(max_num_seqs=16, max_num_batched_tokens=16 * CANVAS + 256)
    together = LLM(make_engine(checkpoint, **config)).generate(
        [prompt(i) for i in range(16)], [params(i) for i in range(16)]
    )
    for i in (0, 5, 15):
        (alone,) = LLM(make_engine(checkpoint, **config)).generate([prompt(i)], [params(i)])
        assert alone.token_ids == together[i].token_ids, f"request {i}"
        assert alone.steps_per_canvas == together[i].steps_per_canvas
    assert all(len(r.token_ids) == 2 * CANVAS and r.finish_reason == "length" for r in together)


def test_a_small_token_budget_interleaves_without_changing_outputs(checkpoint: Checkpoint) -> None:
    """Budget for two canvases: requests queue, prompts are chunked, results stay the same."""
    roomy = LLM(make_engine(checkpoint, max_num_seqs=8, max_num_batched_tokens=8 * CANVAS + 64))
    tight = LLM(make_engine(checkpoint, max_num_seqs=8, max_num_batched_tokens=2 * CANVAS))
    prompts, sampling = [prompt(i) for i in range(6)], [params(i, steps=3) for i in range(6)]
    assert [r.token_ids for r in tight.generate(prompts, sampling)] == [
        r.token_ids for r in roomy.generate(prompts, sampling)
    ]


def test_preemption_on_a_small_cache_keeps_outputs(checkpoint: Checkpoint) -> None:
    """A full-attention cache too small for all running requests forces recompute of the newest."""
    sampling = [params(i, max_tokens=3 * CANVAS, steps=3) for i in range(4)]
    prompts = [prompt(i) for i in range(4)]
    roomy = LLM(make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=4 * CANVAS + 64))
    small = make_engine(
        checkpoint, max_num_seqs=4, max_num_batched_tokens=4 * CANVAS + 64, num_full_blocks=14, block_size=8
    )
    results = LLM(small).generate(prompts, sampling)
    assert small.stats.num_preemptions > 0
    assert [r.token_ids for r in results] == [r.token_ids for r in roomy.generate(prompts, sampling)]
    assert small.scheduler.kv.usage() == 0.0


def test_canvas_snapshots_and_text(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    snapshots = []
    (result,) = LLM(engine).generate(
        ["hi"], [params(3, steps=3)], callback=lambda i, snap: snapshots.append(snap)
    )
    assert [s.step for s in snapshots] == [1, 2, 3, 1, 2, 3]
    assert [s.canvas_index for s in snapshots] == [0, 0, 0, 1, 1, 1]
    assert all(len(s.token_ids) == CANVAS and len(s.confidence) == CANVAS for s in snapshots)
    assert snapshots[2].token_ids == result.token_ids[:CANVAS]
    assert result.text == checkpoint.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.usage is not None and result.usage.denoise_steps == 6 and result.usage.canvases == 2


def test_stats_count_steps_tokens_and_requests(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    LLM(engine).generate([prompt(1), prompt(2)], [params(1, steps=2), params(2, steps=3)])
    stats = engine.stats
    assert stats.num_output_tokens == 4 * CANVAS
    assert stats.num_denoise_passes == 2 * 2 + 2 * 3
    assert stats.num_prefill_tokens == len(prompt(1)) + len(prompt(2))
    assert stats.num_commit_tokens == 2 * CANVAS
    assert stats.finished_by_reason == {"length": 2}
    records = stats.drain_records()
    assert sorted(r.steps_per_canvas for r in records) == [[2, 2], [3, 3]]
    assert all(r.ttft_s is not None and 0 <= r.ttft_s <= r.e2e_s for r in records)
    assert stats.num_running == 0 and stats.kv_usage == 0.0


async def collect(stream_source: AsyncEngine, i: int, cancel_after: int | None = None) -> list[RequestOutput]:
    events = []
    stream = stream_source.generate(
        prompt(i), params(i, max_tokens=3 * CANVAS, steps=2), request_id=f"r{i}", want_canvas=True
    )
    async for event in stream:
        events.append(event)
        if cancel_after is not None and len(events) >= cancel_after:
            await stream.aclose()
            break
    return events


def test_100_concurrent_requests_and_cancelling_half(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, max_num_seqs=32, max_num_batched_tokens=32 * CANVAS)
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(collect(async_engine, i, cancel_after=2 if i % 2 else None) for i in range(100))
        )

    try:
        results = asyncio.run(main())
        for i, events in enumerate(results):
            if i % 2:
                assert len(events) == 2 and not events[-1].finished
            else:
                assert events[-1].finish_reason == "length"
                assert sum(len(e.new_token_ids) for e in events) == 3 * CANVAS
        deadline = asyncio.run(_wait_idle(async_engine))
        assert deadline, "aborted requests were not cleaned up"
        assert engine.scheduler.kv.usage() == 0.0
        assert engine.stats.finished_by_reason == {"length": 50, "abort": 50}
    finally:
        async_engine.shutdown()


async def _wait_idle(async_engine: AsyncEngine, timeout: float = 30.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if async_engine.num_in_flight == 0 and not async_engine.engine.has_unfinished():
            return True
        await asyncio.sleep(0.05)
    return False


async def _until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll the engine's state (not the clock): a loaded machine may take seconds per step."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def test_admission_errors_surface_before_streaming(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, max_num_seqs=1, max_waiting=1)
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def main() -> None:
        with pytest.raises(ValueError, match="empty"):
            async for _ in async_engine.generate([], params(0)):
                pass

        async def drain(i: int) -> None:  # 1,000 steps a canvas: q0 outlives the checks below
            async for _ in async_engine.generate(prompt(i), params(i, steps=1000), request_id=f"q{i}"):
                pass

        scheduler = async_engine.engine.scheduler
        running = asyncio.ensure_future(drain(0))
        assert await _until(lambda: len(scheduler.running) == 1)  # q0 runs (max_num_seqs=1) ...
        waiting = asyncio.ensure_future(drain(1))
        assert await _until(lambda: len(scheduler.waiting) == 1)  # ... and q1 fills the queue (max_waiting=1)
        with pytest.raises(QueueFull, match="retry later"):
            await drain(2)
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        assert await _wait_idle(async_engine)

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_a_failing_loop_fails_every_request_and_reports_dead(
    checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(checkpoint)
    async_engine = AsyncEngine(engine)
    calls = {"n": 0}
    real_execute = engine.runner.execute

    def flaky(work):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real_execute(work)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    async_engine.start()

    async def main() -> None:
        async def run(i: int) -> None:
            async for _ in async_engine.generate(prompt(i), params(i, steps=8)):
                pass

        outcomes = await asyncio.gather(*(run(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, EngineDead) for o in outcomes), outcomes
        assert not async_engine.is_alive
        with pytest.raises(EngineDead):
            await run(9)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        async_engine.shutdown()


def test_context_checks_name_the_field_and_an_unset_max_tokens_fits_the_context(
    checkpoint: Checkpoint,
) -> None:
    engine = make_engine(checkpoint, max_model_len=4 * CANVAS)
    vocab = checkpoint.model.config.vocab_size
    checks = [
        ([2, vocab], SamplingParams(max_tokens=1), "prompt", f"prompt token id {vocab} is outside"),
        ([], SamplingParams(max_tokens=1), "prompt", "prompt is empty"),
        ([2] * (3 * CANVAS + 1), SamplingParams(), "prompt", "maximum context length is 64 tokens"),
        ([2] * 3, SamplingParams(max_tokens=4 * CANVAS), "max_tokens", "lower max_tokens"),
        ([2] * 3, SamplingParams(pinned_canvas=(5,)), "pinned_canvas", "1 positions"),
    ]
    for prompt_ids, request_params, param, phrase in checks:
        with pytest.raises(InvalidParams, match=phrase) as raised:
            engine.add_request("bad", prompt_ids, request_params)
        assert raised.value.param == param
    assert not engine.has_unfinished()
    long_prompt = [2] + [5] * (3 * CANVAS - 1)  # room for one canvas: the default max_tokens is cut to it
    (result,) = LLM(engine).generate([long_prompt], SamplingParams(max_denoising_steps=2, stop_token_ids=()))
    assert len(result.token_ids) == CANVAS and result.finish_reason == "length"
