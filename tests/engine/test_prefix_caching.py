"""Prefix caching in the scheduler: plain ints and the scripted fake runner of test_scheduler.

The fake runner checks that every position a work reads holds the request's own cache token, so a hit
on the wrong blocks (or a block written while shared) fails there, not only in the outputs.
"""

from __future__ import annotations

import pytest

from engine.kv_cache import NULL_BLOCK
from engine.outputs import CausalWork
from tests.engine.test_scheduler import STOP, Harness, Script, assert_finished_as_scripted, make, script


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


# -- cache tails: the last canvas of an ended request ------------------------------------------------


def answer_of(h: Harness, request_id: str, with_stop: bool = False) -> tuple[int, ...]:
    """The request's output, as a client's next prompt repeats it (with the stop id that ended it)."""
    return (*h.output(request_id), *((STOP,) if with_stop else ()))


@pytest.mark.parametrize("cache_final_canvas", [True, False])
def test_next_turn_hits_the_whole_answer_once_the_tail_is_written(cache_final_canvas: bool) -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6, cache_final_canvas=cache_final_canvas)
    first = script(1, prompt_len=8, max_tokens=2 * C, steps=(1, 2))
    h.add("turn1", first)
    h.run()
    assert h.finish("turn1").finish_reason == "length"
    tail = [c for o in h.outputs for c in o.causal if c.request_id == "turn1" and c.start_pos == 16]
    if cache_final_canvas:
        # the step after the last canvas finished wrote it: 8 tokens at positions [16, 24)
        (work,) = tail
        assert work.token_ids == tuple(first.final(1, C))
        assert h.outputs[-1].causal == [work] and h.outputs[-1].denoise == []
        assert h.sched.last_step.num_tail_tokens == 8 and not h.sched.tails
    else:
        assert tail == []
    h.add("turn2", with_prompt(script(2), (*first.prompt, *answer_of(h, "turn1"), 3, 4, 5)))
    h.run()
    usage = h.finish("turn2").usage
    assert usage is not None and usage.cached_tokens == (24 if cache_final_canvas else 16)
    assert_finished_as_scripted(h)


def test_a_stop_id_is_written_with_the_answer_and_nothing_after_it() -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6)
    first = script(1, prompt_len=8, max_tokens=3 * C, steps=(1, 2), stop_at=(1, 3))
    h.add("turn1", first)
    h.run()
    assert h.finish("turn1").finish_reason == "stop" and len(h.output("turn1")) == C + 3
    (work,) = [c for o in h.outputs for c in o.causal if c.request_id == "turn1" and c.start_pos == 16]
    assert work.token_ids == (*first.final(1, C)[:3], STOP)  # 20 tokens: whole blocks, the stop id last
    # a template that closes the turn with the stop id hits it; a client that drops it hits the blocks before
    h.add("with-stop", with_prompt(script(2), (*first.prompt, *answer_of(h, "turn1", True), 5, 6, 7)))
    h.add("without", with_prompt(script(3), (*first.prompt, *answer_of(h, "turn1"), 5, 6, 7)))
    h.run()
    cached = [h.finish(i).usage.cached_tokens for i in ("with-stop", "without")]  # type: ignore[union-attr]
    assert cached == [20, 16]
    assert_finished_as_scripted(h)


def test_an_aborted_request_writes_its_committed_canvas() -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6)
    s = script(1, prompt_len=8, max_tokens=3 * C, steps=(1, 2))
    h.add("a", s)
    h.step()  # prefill and canvas 0's only step: canvas 0 is committed, its commit pass not yet run
    h.abort("a")
    (tail,) = h.sched.tails.values()
    assert (tail.num_computed_tokens, len(tail.token_ids)) == (8, 16)
    h.run()
    assert h.sched.last_step.num_tail_tokens == 8 and not h.sched.tails
    h.add("b", with_prompt(script(2), (*s.cache(16, C), 4)))
    h.run()
    usage = h.finish("b").usage
    assert usage is not None and usage.cached_tokens == 16


def test_an_abort_during_prefill_leaves_no_tail() -> None:
    """Nobody asked for the rest of a prompt whose client hung up."""
    h = make(prefix_caching=True, max_num_batched_tokens=32)
    h.add("long", script(1, prompt_len=90))
    h.step()  # 32 of 90 prompt tokens
    h.abort("long")
    assert not h.sched.tails and not h.sched.kv.request_ids


def test_a_tail_is_dropped_before_a_request_is_refused() -> None:
    """(The hypothesis lifecycle test drops tails in `_make_room` too, before any preemption.)"""
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6, num_full=6)
    h.add("a", script(1, prompt_len=8, max_tokens=C, steps=(1,)))
    h.step()  # a finishes: its tail holds its 2 prompt blocks and waits for the next step
    assert list(h.sched.tails) == ["a"]
    h.add("b", script(2, prompt_len=24, max_tokens=C, steps=(1,)))  # needs all 6 blocks
    out = h.step()
    assert "a" not in h.sched.tails and [c.request_id for c in out.causal] == ["b"]
    assert h.sched.last_step.num_preempted == 0
    h.run()  # b's own tail would need 8 blocks of the 6: it is dropped, not written
    assert h.outputs[-1].causal == [] and not h.sched.tails
    assert_finished_as_scripted(h)


def test_tails_fill_only_the_budget_left_and_one_canvas_a_step() -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6, max_num_batched_tokens=3 * C)
    for i in range(3):  # each leaves a tail of 6 tokens: the partial block [4, 8) and the canvas to 12
        h.add(f"t{i}", script(i, prompt_len=6, max_tokens=C, steps=(1,)))
    h.add("busy", script(9, prompt_len=4, max_tokens=4 * C, steps=(3,)))
    h.run()  # check_step: tails last, at most C tail tokens a step, within the budget
    tail_steps = [o for o in h.outputs if any(c.request_id[0] == "t" and c.start_pos > 0 for c in o.causal)]
    assert len(tail_steps) >= 3  # 18 tail tokens, at most 8 a step
    assert_finished_as_scripted(h)


def test_a_step_with_no_request_work_writes_every_tail_in_its_budget() -> None:
    C = 8
    h = make(prefix_caching=True, canvas=C, window=6)
    for i in range(4):  # all finish in the first step, each leaving 6 tail tokens
        h.add(f"t{i}", script(i, prompt_len=6, max_tokens=C, steps=(1,)))
    h.step()
    assert len(h.sched.tails) == 4
    out = h.step()  # nothing else to run: an offline batch's tails drain at once, not one canvas a step
    assert [c.request_id for c in out.causal] == ["t0", "t1", "t2", "t3"] and not out.denoise
    assert h.sched.last_step.num_tail_tokens == 24 > C
    assert not h.sched.has_unfinished()
    assert_finished_as_scripted(h)
