"""Prefix caching in the scheduler: plain ints and the scripted fake runner of test_scheduler.

The fake runner checks that every position a work reads holds the request's own cache token, so a hit
on the wrong blocks (or a block written while shared) fails there, not only in the outputs.
"""

from __future__ import annotations

import pytest

from engine.kv_cache import NULL_BLOCK
from engine.outputs import CausalWork
from tests.engine.test_scheduler import Harness, Script, assert_finished_as_scripted, make, script


def first_causal(h: Harness, request_id: str, after: int = 0) -> CausalWork:
    return next(c for o in h.outputs[after:] for c in o.causal if c.request_id == request_id)


def with_prompt(s: Script, prompt: tuple[int, ...]) -> Script:
    return Script(prompt, s.seed, s.max_tokens, s.steps, s.stop_at)


def test_shared_prompt_hit_skips_the_cached_blocks_and_counts_them() -> None:
    h = make(prefix_caching=True, block_size=4, window=6)
    shared = script(1, prompt_len=21).prompt
    h.add("a", with_prompt(script(1), shared))
    h.run()
    h.add("b", with_prompt(script(2), (*shared, 7, 8, 9)))  # 24 tokens: blocks 0-4 are a's prompt
    h.step()
    causal = first_causal(h, "b", after=len(h.outputs) - 1)
    assert causal.start_pos == 20 and len(causal.token_ids) == 4  # only the 4 uncached tokens run
    assert h.sched.last_step.num_prefill_tokens == 4
    assert (h.sched.last_step.num_prefix_queries, h.sched.last_step.num_prefix_hits) == (24, 20)
    full = causal.block_tables["full"]
    sliding = causal.block_tables["sliding"]
    assert sliding[:3] == [NULL_BLOCK] * 3  # the window at position 20 reaches back to 15: block 3
    assert all(h.sched.kv.ref_count("full", b) == 1 for b in full)
    h.run()
    usage = h.finish("b").usage
    assert usage is not None and usage.cached_tokens == 20 and usage.prompt_tokens == 24
    a_usage = h.finish("a").usage
    assert a_usage is not None and a_usage.cached_tokens == 0
    assert_finished_as_scripted(h)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    h = make(prefix_caching=True, block_size=4)
    shared = script(1, prompt_len=20).prompt
    h.add("a", with_prompt(script(1), shared))
    h.run()
    h.add("b", with_prompt(script(2), shared))  # 5 whole blocks cached, but one token must run
    h.step()
    causal = first_causal(h, "b", after=len(h.outputs) - 1)
    assert (causal.start_pos, len(causal.token_ids)) == (16, 4)
    h.run()
    assert_finished_as_scripted(h)


def test_concurrent_requests_share_blocks_read_only_with_reference_counts() -> None:
    h = make(prefix_caching=True, block_size=4, window=100, max_num_batched_tokens=64)
    shared = script(1, prompt_len=16).prompt
    h.add("a", with_prompt(script(1, max_tokens=32, steps=(3,)), (*shared, 5)))
    h.step()  # a's prompt is computed and cached after this step
    h.add("b", with_prompt(script(2, max_tokens=32, steps=(3,)), (*shared, 6, 7)))
    h.add("c", with_prompt(script(3, max_tokens=32, steps=(3,)), (*shared, 8)))
    h.step()
    a_full = h.sched.kv.block_table("a", "full")
    for request_id in ("b", "c"):
        assert h.sched.kv.block_table(request_id, "full")[:4] == a_full[:4]
    assert [h.sched.kv.ref_count("full", b) for b in a_full[:4]] == [3] * 4
    assert h.sched.kv.ref_count("full", a_full[4]) == 1  # the partial block is a's alone
    h.abort("b")
    assert [h.sched.kv.ref_count("full", b) for b in a_full[:4]] == [2] * 4
    h.run()
    assert [h.sched.kv.ref_count("full", b) for b in a_full[:4]] == [0] * 4
    assert h.sched.kv.num_cached_blocks("full") >= 4  # freed, still cached
    assert h.finish("c").usage is not None and h.finish("c").usage.cached_tokens == 16


def test_next_turn_hits_the_prompt_and_the_committed_canvases() -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, block_size=4, window=6)
    first = script(1, prompt_len=9, max_tokens=3 * C, steps=(1, 2, 1))
    h.add("turn1", first)
    h.run()
    # canvases 0 and 1 were committed (written causally); the last one never is
    history = first.cache(len(first.prompt) + 2 * C, C)
    h.add("turn2", with_prompt(script(2), (*history, 3, 4, 5)))
    h.step()
    causal = first_causal(h, "turn2", after=len(h.outputs) - 1)
    assert causal.start_pos == 24  # 25 history tokens: 6 whole blocks hit, up to the new message
    h.run()
    usage = h.finish("turn2").usage
    assert usage is not None and usage.cached_tokens == 24
    assert_finished_as_scripted(h)


def test_caching_off_computes_everything_and_registers_nothing() -> None:
    h = make(prefix_caching=False)
    shared = script(1, prompt_len=21).prompt
    h.add("a", with_prompt(script(1), shared))
    h.run()
    h.add("b", with_prompt(script(2), shared))
    h.run()
    assert first_causal(h, "b").start_pos == 0
    assert h.sched.kv.num_cached_blocks("full") == 0
    usage = h.finish("b").usage
    assert usage is not None and usage.cached_tokens == 0


def _preemption_workload(num_full: int, prefix_caching: bool) -> Harness:
    h = make(num_full=num_full, max_num_batched_tokens=48, max_num_seqs=6, prefix_caching=prefix_caching)
    shared = script(99, prompt_len=8).prompt
    for i in range(6):
        s = script(10 + i, prompt_len=3 + 5 * i % 11, max_tokens=24, steps=(1 + i % 3, 2, 3))
        h.add(f"r{i}", with_prompt(s, shared + s.prompt))
    h.run()
    return h


@pytest.mark.parametrize("num_full", [10, 12, 256])
def test_preemption_and_eviction_pressure_keep_the_outputs(num_full: int) -> None:
    reference = _preemption_workload(256, prefix_caching=False)
    cached = _preemption_workload(num_full, prefix_caching=True)
    for request_id in reference.runner.scripts:
        assert cached.output(request_id) == reference.output(request_id)
    assert_finished_as_scripted(cached)
    if num_full == 10:
        assert cached.num_preempted > 0
        victim = cached.preempted[0][1]
        restart = first_causal(cached, victim, after=cached.preempted[0][0] + 1)
        assert restart.start_pos > 0  # it resumes from its own cached prompt and commits
    assert sum(o.dropped_request_ids != [] for o in cached.outputs) > 0
