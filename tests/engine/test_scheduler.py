"""Tests for engine.scheduler: plain ints and a scripted fake runner, no torch and no model.

`FakeRunner` plays the model runner: it keeps a stand-in cache per request (the tokens written by
causal work, checked to be contiguous and to equal prompt + committed canvases), a canvas step count
(reset on `new_canvas`, forgotten on `dropped_request_ids`), and answers each denoise with an argmax
canvas that depends only on (seed, canvas_index, step). Canvas b of a request converges after `steps[b]`
steps, and its converged canvas holds the stop id where the script says. Outputs are therefore the
same however the scheduler batches, chunks or preempts, and `Script.expected` computes them directly.

The fake runner also keeps the content of every physical block (the token id written at each slot,
per group): each work checks that every position it reads holds the token the request's cache must
hold there, which is what makes a prefix-cache hit (blocks written by another request, or by this one
before a preemption) correct or wrong.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.config import DiffusionDefaults
from engine.engine_config import EngineConfig
from engine.kv_cache import NULL_BLOCK, CacheGroupSpec, KVCacheManager, num_blocks_for
from engine.outputs import CausalWork, DenoiseOutcome, DenoiseWork, RunnerOutput, SchedulerOutput
from engine.request import InvalidParams, RequestOutput, RequestStatus, SamplingParams, Usage
from engine.scheduler import QueueFull, Scheduler

STOP = 1
VOCAB = 40
DEFAULTS = DiffusionDefaults(eos_token_ids=(STOP,))


@dataclass(frozen=True)
class Script:
    """What the fake model does for one request."""

    prompt: tuple[int, ...]
    seed: int
    max_tokens: int
    steps: tuple[int, ...] = (2,)
    """Canvas b converges after steps[b] denoise steps; the last entry repeats."""
    stop_at: tuple[int, int] | None = None
    """(canvas_index, position) where the converged canvas holds the stop id."""

    def steps_for(self, canvas_index: int) -> int:
        return self.steps[min(canvas_index, len(self.steps) - 1)]

    def canvas(self, canvas_index: int, step: int, canvas_length: int) -> list[int]:
        rng = random.Random(f"{self.seed}/{canvas_index}/{step}")
        tokens = [rng.randrange(STOP + 1, VOCAB) for _ in range(canvas_length)]
        if (
            step == self.steps_for(canvas_index)
            and self.stop_at is not None
            and self.stop_at[0] == canvas_index
        ):
            tokens[self.stop_at[1]] = STOP
        return tokens

    def final(self, canvas_index: int, canvas_length: int) -> list[int]:
        return self.canvas(canvas_index, self.steps_for(canvas_index), canvas_length)

    def cache(self, num_tokens: int, canvas_length: int) -> list[int]:
        """The first `num_tokens` positions the cache must hold: prompt, then committed canvases."""
        tokens = list(self.prompt)
        while len(tokens) < num_tokens:
            tokens += self.final((len(tokens) - len(self.prompt)) // canvas_length, canvas_length)
        return tokens[:num_tokens]

    def expected(self, canvas_length: int) -> tuple[list[int], str]:
        """Output and finish reason, computed without the scheduler."""
        out: list[int] = []
        for canvas_index in range(self.max_tokens + 1):
            for token in self.final(canvas_index, canvas_length):
                if len(out) == self.max_tokens:
                    return out, "length"
                if token == STOP:
                    return out, "stop"
                out.append(token)
        raise AssertionError("unreachable: max_tokens bounds the output")

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, seed=self.seed).resolve(DEFAULTS)


@dataclass
class _Canvas:
    canvas_index: int
    step: int = 0


class FakeRunner:
    """Turns a `SchedulerOutput` into a `RunnerOutput` from the scripts, checking what it is given."""

    def __init__(
        self,
        scripts: dict[str, Script],
        groups: list[CacheGroupSpec],
        block_size: int,
        canvas: int,
        prefix_caching: bool = False,
    ):
        self.scripts = scripts
        self.windows = {g.name: g.window for g in groups}
        self.block_size = block_size
        self.canvas_length = canvas
        self.prefix_caching = prefix_caching
        self.canvases: dict[str, _Canvas] = {}
        self.cache: dict[str, list[int]] = {}
        self.slots: dict[tuple[str, int, int], int] = {}
        """(group, block id, offset) -> the token whose K/V the slot holds."""
        self.left: dict[str, list[int]] = {}
        """The cache of every dropped request, which a cache tail may go on writing."""

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in out.dropped_request_ids:
            self.canvases.pop(request_id, None)
            self.left[request_id] = self.cache.pop(request_id, [])
        self._check_disjoint_tables(out)
        for work in out.causal:
            self._write(work)
        return RunnerOutput({d.request_id: self._denoise(d) for d in out.denoise})

    def _write(self, work: CausalWork) -> None:
        script = self.scripts[work.request_id]
        cache = self.cache.setdefault(work.request_id, [])
        left = self.left.pop(work.request_id, [])
        if not cache and work.start_pos > 0 and len(left) == work.start_pos:
            assert self.prefix_caching, "only a cache tail goes on writing an ended request's cache"
            cache.extend(left)
        elif not cache and work.start_pos > 0:  # a prefix-cache hit: what it skips must be in its blocks
            assert self.prefix_caching, "a request starts past position 0 only with prefix caching"
            assert work.start_pos % self.block_size == 0, "a hit covers whole blocks"
            cache.extend(script.cache(work.start_pos, self.canvas_length))
        assert work.start_pos == len(cache), "causal work must continue the cache where it stopped"
        cache.extend(work.token_ids)
        assert cache == script.cache(len(cache), self.canvas_length), "cache must be prompt + commits"
        for group, table in work.block_tables.items():
            for pos, token in enumerate(work.token_ids, work.start_pos):
                self.slots[group, table[pos // self.block_size], pos % self.block_size] = token
        self._check_tables(work.block_tables, work.start_pos, len(cache), cache)

    def _denoise(self, work: DenoiseWork) -> DenoiseOutcome:
        script, C = self.scripts[work.request_id], self.canvas_length
        assert work.start_pos == len(self.cache[work.request_id]), "denoise must follow a complete prefix"
        self._check_tables(work.block_tables, work.start_pos, work.start_pos, self.cache[work.request_id])
        canvas_index, rest = divmod(work.start_pos - len(script.prompt), C)
        assert rest == 0 and canvas_index >= 0
        if work.new_canvas is not None:
            assert (work.new_canvas.seed, work.new_canvas.canvas_index) == (script.seed, canvas_index)
            self.canvases[work.request_id] = _Canvas(canvas_index)
        canvas = self.canvases[work.request_id]  # KeyError: a canvas denoised before it was started
        assert canvas.canvas_index == canvas_index
        canvas.step += 1
        finished = canvas.step >= script.steps_for(canvas_index)
        show = finished or work.want_canvas
        argmax = script.canvas(canvas_index, canvas.step, C) if show else None
        return DenoiseOutcome(canvas.step, finished, num_accepted=1, mean_entropy=0.5, argmax=argmax)

    def _check_tables(
        self, tables: dict[str, list[int]], query_start: int, cache_end: int, cache: list[int]
    ) -> None:
        """Every block the work reads or writes is backed: [0, end) in full groups, the window in others;
        and every position it reads holds the K/V of the request's own cache token there."""
        for group, table in tables.items():
            window = self.windows[group]
            first = 0 if window is None else max(0, query_start - window + 1)
            needed = range(first // self.block_size, num_blocks_for(cache_end, self.block_size))
            assert len(table) >= len(needed) and all(table[i] != NULL_BLOCK for i in needed), (group, table)
            for pos in range(first, cache_end):
                slot = (group, table[pos // self.block_size], pos % self.block_size)
                assert self.slots.get(slot) == cache[pos], f"{group} position {pos} holds the wrong K/V"

    def _check_disjoint_tables(self, out: SchedulerOutput) -> None:
        """Without prefix caching no block is in two requests' tables; with it, no block written in
        this step is in another request's table (shared blocks are read-only)."""
        owner: dict[tuple[str, int], str] = {}
        written = {
            (group, table[pos // self.block_size]): c.request_id
            for c in out.causal
            for group, table in c.block_tables.items()
            for pos in range(c.start_pos, c.start_pos + len(c.token_ids))
        }
        for work in [*out.causal, *out.denoise]:
            for group, table in work.block_tables.items():
                for block_id in table:
                    if block_id == NULL_BLOCK:
                        continue
                    writer = written.get((group, block_id))
                    assert writer is None or writer == work.request_id, "a written block is shared"
                    if not self.prefix_caching:
                        assert owner.setdefault((group, block_id), work.request_id) == work.request_id


@dataclass
class Harness:
    """A scheduler, its fake runner and every event it produced, checked after every step."""

    sched: Scheduler
    runner: FakeRunner
    totals: dict[str, int]
    events: dict[str, list[RequestOutput]] = field(default_factory=lambda: defaultdict(list))
    outputs: list[SchedulerOutput] = field(default_factory=list)
    preempted: list[tuple[int, str]] = field(default_factory=list)
    """(step index, request id) of every preemption of a request that was running before the step."""
    num_preempted: int = 0
    """Preemptions over all steps (the scheduler's own count, step by step)."""
    num_tail_tokens: int = 0
    """Cache tail tokens written over all steps."""
    num_tails_dropped: int = 0
    """Cache tails dropped for want of blocks (gone in a `schedule()`: a written one goes in `update`)."""

    def add(self, request_id: str, script: Script, want_canvas: bool = False) -> None:
        self.sched.add_request(request_id, list(script.prompt), script.params(), want_canvas)
        self.runner.scripts[request_id] = script

    def step(self) -> SchedulerOutput:
        running_before = [r.request_id for r in self.sched.running]
        tails_before = set(self.sched.tails)
        out = self.sched.schedule()
        self.num_tails_dropped += len(tails_before - set(self.sched.tails))
        self.num_tail_tokens += self.sched.last_step.num_tail_tokens
        preempted = check_step(self.sched, out, running_before)
        self.preempted += [(len(self.outputs), request_id) for request_id in preempted]
        self.num_preempted += self.sched.last_step.num_preempted
        self.outputs.append(out)
        for event_ in self.sched.update(out, self.runner.execute(out)):
            self.events[event_.request_id].append(event_)
        check_invariants(self.sched, self.totals)
        return out

    def run(self, max_steps: int = 5_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def abort(self, request_id: str) -> RequestOutput | None:
        output = self.sched.abort(request_id)
        if output is not None:
            self.events[request_id].append(output)
        check_invariants(self.sched, self.totals)
        return output

    def output(self, request_id: str) -> list[int]:
        return [t for e in self.events[request_id] for t in e.new_token_ids]

    def finish(self, request_id: str) -> RequestOutput:
        (finish,) = [e for e in self.events[request_id] if e.finished]
        return finish

    def denoised(self, step: int) -> list[str]:
        return [d.request_id for d in self.outputs[step].denoise]


def make(
    canvas: int = 8,
    block_size: int = 4,
    num_full: int = 256,
    num_sliding: int = 256,
    window: int = 6,
    prefix_caching: bool = False,
    **config: int,
) -> Harness:
    """A scheduler over a full and a sliding group; prefix caching is off unless asked for, so that the
    tests of chunking and preemption see every position computed."""
    groups = [CacheGroupSpec("full", num_full, None), CacheGroupSpec("sliding", num_sliding, window)]
    config.setdefault("max_model_len", 1024)
    config.setdefault("max_num_batched_tokens", 4096)
    engine_config = EngineConfig(**config, enable_prefix_caching=prefix_caching)  # type: ignore[arg-type]
    sched = Scheduler(engine_config, canvas, KVCacheManager(groups, block_size))
    runner = FakeRunner({}, groups, block_size, canvas, prefix_caching)
    return Harness(sched, runner, {g.name: g.num_blocks for g in groups})


def num_causal_tokens(out: SchedulerOutput) -> int:
    return sum(len(c.token_ids) for c in out.causal)


def check_step(sched: Scheduler, out: SchedulerOutput, running_before: list[str]) -> list[str]:
    """Budgets hold, each request has at most one work of each kind, and preemption took the newest
    running requests and put them back at the front of the queue. Returns the preempted ids."""
    config = sched.config
    assert (
        num_causal_tokens(out) + sched.canvas_length * len(out.denoise)
        <= config.resolved_max_num_batched_tokens
    )
    assert len(sched.running) <= config.max_num_seqs
    for works in (out.causal, out.denoise):
        ids = [w.request_id for w in works]
        assert len(ids) == len(set(ids))
        assert all(sched.requests[i].status is RequestStatus.RUNNING for i in ids if i not in sched.tails)
    assert all(d.request_id in sched.requests for d in out.denoise)
    assert all(c.token_ids for c in out.causal)
    composition = sched.last_step
    tail_works = [c for c in out.causal if c.request_id in sched.tails]
    assert out.causal[len(out.causal) - len(tail_works) :] == tail_works, "tails come after all requests"
    assert sum(len(c.token_ids) for c in tail_works) == composition.num_tail_tokens
    if len(tail_works) < len(out.causal) or out.denoise:  # beside request work: at most one canvas
        assert composition.num_tail_tokens <= sched.canvas_length
    assert composition.num_preempted == 0 or not tail_works, "a tail is dropped before anyone is preempted"
    assert (
        composition.num_prefill_tokens + composition.num_commit_tokens + composition.num_tail_tokens
        == num_causal_tokens(out)
    )
    assert composition.num_denoise_canvases == len(out.denoise)
    preempted = [i for i in running_before if i in out.dropped_request_ids and i in sched.requests]
    assert preempted == running_before[len(running_before) - len(preempted) :], "newest go first"
    assert composition.num_preempted == len(preempted)
    still_waiting = [i for i in preempted if sched.requests[i].status is not RequestStatus.RUNNING]
    assert [r.request_id for r in sched.waiting][: len(still_waiting)] == still_waiting
    return preempted


def check_invariants(sched: Scheduler, totals: dict[str, int]) -> None:
    """Each live request is in exactly one queue; running ones hold blocks; pools add up."""
    waiting = [r.request_id for r in sched.waiting]
    running = [r.request_id for r in sched.running]
    assert len(set(waiting) | set(running)) == len(waiting) + len(running)
    assert set(waiting) | set(running) == set(sched.requests)
    assert len(waiting) <= sched.config.max_waiting
    kv = sched.kv
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.request_id not in kv.request_ids and r.num_computed_tokens == 0
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING and r.num_computed_tokens > 0
        assert len(kv.block_table(r.request_id, "full")) >= num_blocks_for(
            r.num_computed_tokens, kv.block_size
        )
    tails = list(sched.tails)
    assert not set(tails) & set(sched.requests)
    assert all(t.num_pending > 0 for t in sched.tails.values()), "a written tail is freed at once"
    assert all(len(t.token_ids) % kv.block_size == 0 for t in sched.tails.values()), "whole blocks"
    assert set(kv.request_ids) == set(running) | set(tails)
    for group, total in totals.items():
        live = [b for i in running + tails for b in kv.block_table(i, group) if b != NULL_BLOCK]
        if not sched.config.enable_prefix_caching:
            assert len(live) == len(set(live))
        assert len(set(live)) == kv.num_used_blocks(group)
        assert all(kv.ref_count(group, b) == live.count(b) for b in set(live)), "reference counts"
        assert kv.num_used_blocks(group) + kv.num_free_blocks(group) == total


def script(
    seed: int,
    prompt_len: int = 5,
    max_tokens: int = 16,
    steps: tuple[int, ...] = (2,),
    stop_at: tuple[int, int] | None = None,
) -> Script:
    rng = random.Random(seed)
    prompt = tuple(rng.randrange(STOP + 1, VOCAB) for _ in range(prompt_len))
    return Script(prompt, seed, max_tokens, steps, stop_at)


def assert_finished_as_scripted(h: Harness) -> None:
    C = h.sched.canvas_length
    for request_id, s in h.runner.scripts.items():
        tokens, reason = s.expected(C)
        finish = h.finish(request_id)
        assert (h.output(request_id), finish.finish_reason) == (tokens, reason), request_id
        assert finish.usage is not None and finish.usage.completion_tokens == len(tokens)
    assert all(h.sched.kv.num_used_blocks(g) == 0 for g in h.totals)


# -- budgets, chunking, block lifecycle --------------------------------------------------------------


def test_budget_and_sequence_limits_hold_every_step() -> None:
    h = make(max_num_batched_tokens=40, max_num_seqs=3)
    for i in range(12):
        h.add(f"r{i}", script(i, prompt_len=1 + 7 * i % 30, max_tokens=4 + 5 * i % 20, steps=(1 + i % 3, 2)))
    h.run()  # check_step asserts both limits after every schedule()
    assert max(len(out.denoise) for out in h.outputs) == 3  # the sequence limit binds, not only budget
    assert max(num_causal_tokens(o) + 8 * len(o.denoise) for o in h.outputs) == 40
    assert_finished_as_scripted(h)


def test_long_prompt_is_chunked_while_running_requests_keep_denoising() -> None:
    h = make(max_num_batched_tokens=32, window=6, num_sliding=64)
    for i in range(2):
        h.add(f"short{i}", script(i, prompt_len=4, max_tokens=8, steps=(60,)))
    h.step()
    h.add("long", script(9, prompt_len=200, max_tokens=8, steps=(1,)))
    chunks: list[CausalWork] = []
    while not chunks or chunks[-1].start_pos + len(chunks[-1].token_ids) < 200:
        out = h.step()
        chunks += [c for c in out.causal if c.request_id == "long"]
        done = chunks[-1].start_pos + len(chunks[-1].token_ids) == 200
        assert sorted(h.denoised(-1)) == ["long", "short0", "short1"][not done :]  # nobody stalls
        sliding_held = [b for b in h.sched.kv.block_table("long", "sliding") if b != NULL_BLOCK]
        assert len(sliding_held) <= num_blocks_for(6 - 1 + 32, 4) + 1  # the window is released as it moves
    assert len(chunks) == 13 and len(h.outputs) == 14  # 16 tokens a step: 200 = 12 * 16 + 8
    starts = [c.start_pos for c in chunks]
    assert starts == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
    assert [t for c in chunks for t in c.token_ids] == list(h.runner.scripts["long"].prompt)
    assert h.outputs[-1].denoise[-1].start_pos == 200  # its first denoise rides with the last chunk
    h.run()
    assert_finished_as_scripted(h)


def test_prefill_then_denoise_then_commit_then_next_block_in_the_same_steps() -> None:
    h = make(max_num_batched_tokens=64)
    s = script(3, prompt_len=5, max_tokens=24, steps=(2, 1, 3))
    h.add("a", s)
    first = h.step()
    (causal,) = first.causal
    (denoise,) = first.denoise
    assert (causal.start_pos, causal.token_ids) == (0, s.prompt)
    assert denoise.start_pos == 5 and denoise.new_canvas is not None
    assert (denoise.new_canvas.canvas_index, denoise.new_canvas.seed) == (0, 3)
    assert denoise.new_canvas.stability_threshold == DEFAULTS.stability_threshold
    assert h.events["a"] == []
    second = h.step()
    assert second.causal == [] and second.denoise[0].new_canvas is None
    assert h.output("a") == s.final(0, 8)  # converged at step 2: canvas 0 committed to the output
    third = h.step()
    (commit,) = third.causal
    (next_block,) = third.denoise
    assert (commit.start_pos, list(commit.token_ids)) == (5, s.final(0, 8))
    assert next_block.start_pos == 13 and next_block.new_canvas is not None
    assert next_block.new_canvas.canvas_index == 1
    h.run()
    assert h.finish("a").usage is not None and h.finish("a").usage.steps_per_canvas == (2, 1, 3)
    assert_finished_as_scripted(h)


def test_requests_with_different_step_counts_leave_independently() -> None:
    h = make(max_num_batched_tokens=64)
    h.add("fast", script(1, prompt_len=3, max_tokens=8, steps=(1,)))
    h.add("slow", script(2, prompt_len=6, max_tokens=16, steps=(5, 4)))
    h.step()
    assert h.finish("fast").finish_reason == "length"
    for _ in range(8):
        h.step()
        assert h.denoised(-1) == ["slow"]
    assert not h.sched.has_unfinished()
    fast, slow = h.finish("fast").usage, h.finish("slow").usage
    assert fast is not None and slow is not None
    assert (fast.denoise_steps, fast.canvases, fast.steps_per_canvas) == (1, 1, (1,))
    assert (slow.denoise_steps, slow.canvases, slow.steps_per_canvas) == (9, 2, (5, 4))
    assert (slow.prompt_tokens, slow.completion_tokens) == (6, 16)
    assert len(h.outputs) == 9  # the slow one: prefill+step 1, 4 more, commit+step 1, 3 more
    assert_finished_as_scripted(h)


@pytest.mark.parametrize(
    ("max_tokens", "stop_at", "output_len", "reason"),
    [
        (24, (1, 3), 11, "stop"),  # stop id at position 3 of canvas 1
        (24, (0, 0), 0, "stop"),  # stop id first: nothing out
        (13, None, 13, "length"),  # cut inside canvas 1
        (16, None, 16, "length"),  # exactly two canvases
        (10, (1, 4), 10, "length"),  # the stop id lies beyond max_tokens
        (12, (1, 4), 12, "length"),  # the stop id just past max_tokens
        (13, (1, 4), 12, "stop"),  # the stop id at the last position max_tokens allows
    ],
)
def test_output_is_cut_at_the_first_stop_id_or_max_tokens(
    max_tokens: int, stop_at: tuple[int, int] | None, output_len: int, reason: str
) -> None:
    h = make()
    s = script(5, max_tokens=max_tokens, steps=(2, 3, 1), stop_at=stop_at)
    h.add("a", s)
    h.run()
    canvases = s.final(0, 8) + s.final(1, 8)
    assert h.output("a") == canvases[:output_len]
    assert h.finish("a").finish_reason == reason
    assert [e.finished for e in h.events["a"]][-1] and sum(e.finished for e in h.events["a"]) == 1
    assert_finished_as_scripted(h)


# -- preemption ---------------------------------------------------------------------------------------


def _preemption_workload(num_full: int) -> Harness:
    h = make(num_full=num_full, max_num_batched_tokens=48, max_num_seqs=6)
    for i in range(6):
        h.add(f"r{i}", script(10 + i, prompt_len=3 + 5 * i % 11, max_tokens=24, steps=(1 + i % 3, 2, 3)))
    h.run()
    return h


def test_preemption_frees_requeues_and_reproduces_the_unpreempted_outputs() -> None:
    roomy = _preemption_workload(num_full=256)
    tight = _preemption_workload(num_full=8)  # one request needs at most 7 blocks of 4
    assert roomy.num_preempted == 0 and tight.num_preempted > 0
    for request_id in roomy.runner.scripts:
        assert tight.output(request_id) == roomy.output(request_id)
        assert tight.finish(request_id).finish_reason == roomy.finish(request_id).finish_reason
    assert_finished_as_scripted(tight)
    for step, victim in tight.preempted:  # reported dropped, then recomputed from position 0
        assert victim in tight.outputs[step].dropped_request_ids
        restart = next(c for o in tight.outputs[step:] for c in o.causal if c.request_id == victim)
        assert restart.start_pos == 0


def test_preempted_request_goes_back_to_the_front_of_the_queue() -> None:
    h = make(num_full=8, max_num_batched_tokens=48, max_num_seqs=2)
    for i, request_id in enumerate(["old", "new", "queued"]):
        h.add(request_id, script(i, prompt_len=4, max_tokens=24, steps=(1,)))
    h.step()  # both prefill and converge canvas 0
    h.step()  # both commit: 12 positions, 3 blocks each
    out = h.step()  # old commits to 20 positions (5 blocks); new cannot: it is the newest, so it goes
    assert h.preempted == [(2, "new")] and "new" in out.dropped_request_ids
    assert [r.request_id for r in h.sched.waiting] == ["new", "queued"]
    assert h.sched.requests["new"].status is RequestStatus.PREEMPTED and "new" not in h.sched.kv.request_ids
    assert [c.request_id for c in out.causal] == ["old"]
    h.run()
    starts = [c.request_id for o in h.outputs[3:] for c in o.causal if c.start_pos == 0]
    assert starts == ["new", "queued"]
    assert_finished_as_scripted(h)


def test_a_request_longer_than_the_sliding_pool_runs_when_its_window_fits() -> None:
    # The engine sizes a sliding group for ceil((W - 1 + max_num_batched_tokens) / block_size) + 1 blocks
    # per request (`cache_blocks`), however long requests are: the scheduler must accept and run them.
    per_request = num_blocks_for(8 - 1 + 16, 4) + 1
    assert per_request == 7
    h = make(num_full=64, num_sliding=2 * per_request, window=8, max_num_batched_tokens=16, max_num_seqs=2)
    assert h.sched.kv.max_blocks_held("sliding", 120, 16) == 7
    assert h.sched.kv.max_blocks_held("full", 120, 16) == 30
    h.add("a", script(1, prompt_len=40, max_tokens=64, steps=(1, 2)))  # caches 96 positions: 24 blocks
    h.add("b", script(2, prompt_len=3, max_tokens=80, steps=(2, 1)))
    h.run()
    assert_finished_as_scripted(h)
    with pytest.raises(InvalidParams, match="group 'sliding'"):
        make(num_sliding=per_request - 1, window=8, max_num_batched_tokens=16).add("c", script(3, 40, 64))


# -- abort ------------------------------------------------------------------------------------------


def _reach(state: str) -> Harness:
    h = make(max_num_batched_tokens=24)
    h.add("other", script(7, prompt_len=2, max_tokens=8, steps=(3,)))
    if state != "waiting":
        h.step()
    steps = (1,) if state == "commit" else (5,)
    h.add("a", script(8, prompt_len=40 if state == "prefill" else 3, max_tokens=16, steps=steps))
    if state != "waiting":
        h.step()
    request = h.sched.requests["a"]
    if state == "waiting":
        assert request.status is RequestStatus.WAITING
    elif state == "prefill":
        assert 0 < request.num_computed_tokens < 40
    elif state == "denoising":
        assert request.canvas_started and request.num_pending_causal == 0
    else:
        assert request.num_pending_causal == 8  # converged, its commit not yet scheduled
    return h


@pytest.mark.parametrize("state", ["waiting", "prefill", "denoising", "commit"])
def test_abort_in_any_state_frees_blocks_and_reports_once(state: str) -> None:
    h = _reach(state)
    other_blocks = {g: h.sched.kv.num_used_blocks(g) for g in h.totals}
    finished = h.abort("a")
    assert finished is not None and finished.finish_reason == "abort" and finished.usage is not None
    assert "a" not in h.sched.kv.request_ids
    other = {g: len([b for b in h.sched.kv.block_table("other", g) if b != NULL_BLOCK]) for g in h.totals}
    assert {g: h.sched.kv.num_used_blocks(g) for g in h.totals} == other
    assert all(other[g] <= other_blocks[g] for g in h.totals)
    assert h.abort("a") is None and h.abort("nobody") is None
    assert "a" in h.step().dropped_request_ids
    assert "a" not in h.step().dropped_request_ids
    h.run()
    assert h.finish("other").finish_reason == "length"
    assert h.abort("other") is None  # already finished
    assert all(h.sched.kv.num_used_blocks(g) == 0 for g in h.totals)


def test_abort_between_schedule_and_update_drops_the_result() -> None:
    h = make()
    h.add("a", script(1, steps=(1,)))
    out = h.sched.schedule()
    result = h.runner.execute(out)
    assert h.sched.abort("a") is not None
    assert h.sched.update(out, result) == []
    check_invariants(h.sched, h.totals)
    assert h.sched.schedule().dropped_request_ids == ["a"]


# -- admission ------------------------------------------------------------------------------------------


def test_queue_full_and_invalid_requests_say_what_to_change() -> None:
    h = make(num_full=16, num_sliding=16, max_waiting=2, max_model_len=128)
    h.add("a", script(1))
    h.add("b", script(2))
    with pytest.raises(QueueFull, match="retry later"):
        h.add("c", script(3))
    h.step()  # both start running: the queue has room again
    h.add("c", script(3))
    with pytest.raises(InvalidParams, match="prompt is empty"):
        h.sched.add_request("d", [], script(4).params())
    with pytest.raises(InvalidParams, match="already in use"):
        h.add("a", script(4))
    with pytest.raises(InvalidParams, match="max_model_len is 128: shorten the prompt or lower max_tokens"):
        h.add("d", script(4, prompt_len=120, max_tokens=9))  # 120 + 2 canvases of 8 = 136 positions
    whole = r"whole cache holds \(16 blocks of 4 in group 'full'\): shorten the prompt or lower max_tokens"
    with pytest.raises(InvalidParams, match=whole):
        h.add("d", script(4, prompt_len=60, max_tokens=16))  # caches 60 + 8 = 68 positions: 17 blocks
    assert "d" not in h.sched.requests
    h.add("d", script(4, prompt_len=60, max_tokens=8))  # caches 60 positions: 15 blocks, fits alone
    h.run()
    assert_finished_as_scripted(h)


def test_waiting_requests_start_first_come_first_served() -> None:
    h = make(max_num_seqs=2, max_num_batched_tokens=24)
    order = [f"r{i}" for i in range(7)]
    for i, request_id in enumerate(order):
        h.add(request_id, script(i, prompt_len=1 + (5 * i) % 13, max_tokens=8, steps=(1 + i % 3,)))
    h.run()
    started = list(dict.fromkeys(c.request_id for o in h.outputs for c in o.causal))
    assert started == order
    assert_finished_as_scripted(h)


# -- property test over random lifecycles ----------------------------------------------------------------


@dataclass(frozen=True)
class Lifecycle:
    script: Script
    arrival: int
    abort_after: int | None


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, int], list[Lifecycle]]:
    C = draw(st.sampled_from([4, 8]))
    lifecycles = []
    for i in range(20):
        steps = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        stop = draw(st.none() | st.tuples(st.integers(0, 2), st.integers(0, C - 1)))
        s = script(
            draw(st.integers(0, 2**30)) * 32 + i, draw(st.integers(1, 30)), draw(st.integers(1, 3 * C))
        )
        s = Script(_shared_head(draw, lifecycles, C) + s.prompt, s.seed, s.max_tokens, tuple(steps), stop)
        abort_after = draw(st.none() | st.none() | st.integers(0, 25))
        lifecycles.append(Lifecycle(s, draw(st.integers(0, 30)), abort_after))
    block_size = draw(st.sampled_from([2, 4, 8]))
    need = max(
        num_blocks_for(len(x.script.prompt) + (-(-x.script.max_tokens // C) - 1) * C, block_size)
        for x in lifecycles
    )
    window, budget = draw(st.integers(2, 20)), draw(st.integers(2 * C, 8 * C))
    sliding_need = min(
        need, num_blocks_for(window - 1 + budget, block_size) + 1
    )  # the window, not the length
    config = dict(
        canvas=C,
        block_size=block_size,
        window=window,
        num_full=need + draw(st.integers(0, need // 2)),
        num_sliding=sliding_need + draw(st.integers(0, sliding_need)),
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(2, 8)),
        prefix_caching=draw(st.booleans()),
    )
    return config, lifecycles


SHARED_PREFIX = tuple(range(STOP + 1, STOP + 12))


def _shared_head(draw: st.DrawFn, earlier: list[Lifecycle], canvas: int) -> tuple[int, ...]:
    """What a prompt starts with: nothing, a prefix shared by many requests, an earlier request's
    prompt and some of its committed canvases, or its prompt and its whole answer, with the stop id
    that ended it (the next turn of its conversation)."""
    kind = draw(st.sampled_from(["none", "none", "prefix", "turn", "answer"]))
    if kind == "prefix":
        return SHARED_PREFIX
    if kind == "answer" and earlier:
        previous = draw(st.sampled_from(earlier)).script
        tokens, reason = previous.expected(canvas)
        return (*previous.prompt, *tokens, *((STOP,) if reason == "stop" else ()))
    if kind == "turn" and earlier:
        previous = draw(st.sampled_from(earlier)).script
        num_canvases = draw(st.integers(0, 2))
        return tuple(previous.cache(len(previous.prompt) + num_canvases * canvas, canvas))
    return ()


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_random_lifecycles_keep_invariants_and_end_clean(
    scenario: tuple[dict[str, int], list[Lifecycle]],
) -> None:
    config, lifecycles = scenario
    h = make(**config)
    ids = [f"r{i}" for i in range(len(lifecycles))]
    for step in range(5_000):
        for request_id, life in zip(ids, lifecycles, strict=True):
            if life.arrival == step:
                h.add(request_id, life.script)
            if life.abort_after is not None and life.arrival + life.abort_after == step:
                already_done = any(e.finished for e in h.events[request_id])
                assert (h.abort(request_id) is None) == already_done
        if step > 30 and not h.sched.has_unfinished():
            break
        h.step()
    else:
        raise AssertionError("random lifecycle did not finish")
    event(f"preempted: {h.num_preempted > 0}")
    event(f"aborted: {any(h.finish(i).finish_reason == 'abort' for i in ids)}")
    hits = any((h.finish(i).usage or Usage(0, 0, 0, 0)).cached_tokens > 0 for i in ids)
    event(f"prefix cache hits: {hits}")
    event(f"cache tails written: {h.num_tail_tokens > 0}, dropped: {h.num_tails_dropped > 0}")
    C = config["canvas"]
    for request_id, life in zip(ids, lifecycles, strict=True):
        finish = h.finish(request_id)  # exactly one finish event
        tokens, reason = life.script.expected(C)
        if finish.finish_reason == "abort":
            assert life.abort_after is not None and tokens[: len(h.output(request_id))] == h.output(
                request_id
            )
        else:
            assert (h.output(request_id), finish.finish_reason) == (tokens, reason)
    assert sorted(r.request_id for r in h.sched.newly_finished) == sorted(ids)
    assert not h.sched.requests and not h.sched.kv.request_ids
    assert all(h.sched.kv.num_used_blocks(g) == 0 for g in h.totals)  # free, or cached with count 0
