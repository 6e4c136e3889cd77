"""Continuous-batching scheduler for block diffusion (no torch).

Every step packs, under a token budget, into one forward:
1. a denoise pass (C tokens) for every running canvas whose K/V prefix is complete;
2. causal work of running requests: commits of converged canvases and prompt chunks, each followed by
   its request's denoise pass in the same step when it completes the prefix (the runner runs causal
   work first in every layer, so that pass reads what the commit just wrote);
3. newly admitted requests, first come first served, starting with their first prompt chunk;
4. cache tails of ended requests (below), in the budget left.

Long prompts are chunked to the leftover budget, so they never stall running canvases. Each canvas
converges, commits and finishes on its own schedule. When cache blocks run out, the newest running
request is preempted: its blocks are freed and it is recomputed later from its prompt and committed
canvases (its canvases are seeded per canvas index, so it draws the same tokens again).

With prefix caching (`EngineConfig.enable_prefix_caching`), every request starting to run (new, or
back from preemption) first takes the longest cached head of its cache tokens (`KVCacheManager.
find_cached_prefix`, capped one token short, so at least one token is always computed): its
num_computed_tokens starts there and only the rest is scheduled and counted in the budget. After each
step's causal work ran, the scheduler registers the request's newly computed full blocks, prompt and
committed canvases alike (`cache_blocks`), before releasing what fell out of the window. Blocks are
registered only in `update`, after the runner wrote them, so a block is never found by a request in
the step that writes it; a cached block is full and computed, so no work ever writes into a shared
block, and a denoise reading K/V written by the same step's causal work still reads its own blocks.

A request that ends with prefix caching on may leave a *cache tail* (`engine.cache_tail`): its last
canvas, still unwritten, kept with the request's blocks and written by one causal pass scheduled after
everything else (at most one canvas of tokens beside request work). Tails hold blocks only while
nobody needs them: they are dropped before a request is preempted or refused. A tail is written in the
step after its request ended, so a next turn admitted in that very step computes the answer itself;
a server's round trip to its client gives the tail that step.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

from engine.cache_tail import CacheTail, cache_tail
from engine.canvas_end import commit_spec, end_canvas, repeated_tokens
from engine.engine_config import EngineConfig
from engine.kv_cache import CacheHit, KVCacheManager, num_blocks_for
from engine.lora.admission import lora_cache_key, pick_admissible
from engine.outputs import CausalWork, DenoiseOutcome, DenoiseWork, NewCanvas, RunnerOutput, SchedulerOutput
from engine.request import (
    CanvasSnapshot,
    FinishReason,
    InvalidParams,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    StepParams,
    Usage,
)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class StepComposition:
    """What one scheduled step holds (for metrics)."""

    num_prefill_tokens: int = 0
    """Prompt tokens written to the KV cache (a prompt chunk, or a prompt recomputed after preemption)."""
    num_commit_tokens: int = 0
    """Tokens of committed canvases written to the KV cache (commit passes and their recomputation);
    not the tokens added to outputs, which `EngineStats.num_output_tokens` counts."""
    num_denoise_canvases: int = 0
    """Canvases given one denoise pass."""
    num_preempted: int = 0
    """Running requests preempted to make room in the cache."""
    num_prefix_queries: int = 0
    """Cache tokens of the requests that started running, looked up in the prefix cache."""
    num_prefix_hits: int = 0
    """Of those, the tokens found cached (not computed)."""
    num_tail_tokens: int = 0
    """Tokens of cache tails written to the KV cache: ended requests' last canvases (`engine.cache_tail`);
    not in `num_commit_tokens`."""


@dataclass
class _Plan:
    """The step being built: work lists and the budget left."""

    budget: int
    causal: list[CausalWork] = field(default_factory=list)
    denoise: list[DenoiseWork] = field(default_factory=list)
    composition: StepComposition = field(default_factory=StepComposition)


class Scheduler:
    """Owns the requests and the KV block manager; never sees a tensor.

    Invariants: a request is in exactly one of `waiting` (WAITING or PREEMPTED) and `running`
    (RUNNING); a running request holds cache blocks for [0, num_computed_tokens); a finished or
    aborted request holds none and is reported once in the next `SchedulerOutput.dropped_request_ids`.
    """

    def __init__(self, config: EngineConfig, canvas_length: int, kv: KVCacheManager) -> None:
        """`config.max_model_len` must be set (the engine resolves it from the model); an unset token
        budget is sized here. Raises ValueError when the budget cannot hold one canvas."""
        self.config = config.resolve(canvas_length, config.resolved_max_model_len)
        self.canvas_length = canvas_length
        """Tokens per canvas (the model's `canvas_length`)."""
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._step_params: dict[str, StepParams] = {}
        self._dropped: list[str] = []
        self.newly_finished: list[Request] = []
        """Requests finished since the engine last drained this list (for statistics)."""
        self.tails: dict[str, CacheTail] = {}
        """Cache tails still to write, oldest first; each holds its ended request's block tables."""
        self.last_step = StepComposition()

    # -- admission and abort ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        want_canvas: bool = False,
        arrival_time: float | None = None,
        lora_name: str | None = None,
        lora_id: int | None = None,
    ) -> Request:
        """Queue a request. `params` must be resolved. Raises `InvalidParams` or `QueueFull`.

        `lora_name` / `lora_id`: the adapter the request runs with and its per-load id (None: the base);
        its cached blocks are keyed by that id."""
        if request_id in self.requests:
            raise InvalidParams(f"request id {request_id!r} is already in use")
        if request_id in self.tails:
            self._drop_tail(request_id)  # its block tables go by the same id
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound): retry later")
        self._check_fits(prompt_token_ids, params)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        now = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id, list(prompt_token_ids), params, seed, now, want_canvas)
        if lora_id is not None:
            request.lora_name, request.lora_id, request.cache_key = (
                lora_name,
                lora_id,
                lora_cache_key(lora_id),
            )
        self.requests[request_id] = request
        self._step_params[request_id] = StepParams.from_sampling(params)
        self.waiting.append(request)
        return request

    def _check_fits(self, prompt: list[int], params: SamplingParams) -> None:
        """The prompt is not empty, it and max_tokens fit the context, and the cache can hold them."""
        assert params.max_tokens is not None
        if not prompt:
            raise InvalidParams("prompt is empty: give at least one token", "prompt")
        canvas = self.canvas_length
        needed = len(prompt) + num_blocks_for(params.max_tokens, canvas) * canvas
        max_model_len = self.config.resolved_max_model_len
        if needed > max_model_len:
            asked = f"max_tokens={params.max_tokens} (whole canvases of {canvas})"
            raise context_error(len(prompt), asked, needed, max_model_len, "max_tokens")
        for group in self.kv.group_names:
            total = self.kv.num_free_blocks(group) + self.kv.num_used_blocks(group)
            if (
                self.kv.max_blocks_held(group, needed - canvas, self.config.resolved_max_num_batched_tokens)
                > total
            ):
                raise InvalidParams(
                    f"this request needs more KV cache than the whole cache holds ({total} blocks of "
                    f"{self.kv.block_size} in group {group!r}): shorten the prompt or lower max_tokens"
                )

    def abort(self, request_id: str, reason: FinishReason = "abort") -> RequestOutput | None:
        """End a request in any state and free its blocks (a running one may keep them as a cache tail
        of its committed canvases); None if it is unknown or already done.

        `reason` is "abort" unless the API side ended it on purpose (a stop string it found: "stop")."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request in self.waiting:
            self.waiting.remove(request)
        return self._finish(request, reason)

    # -- scheduling ------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        """Requests to run, or cache tails to write (a step with only tails returns no events)."""
        return bool(self.waiting or self.running or self.tails)

    def schedule(self) -> SchedulerOutput:
        """Build one step's work under the token and sequence budgets."""
        plan = _Plan(budget=self.config.resolved_max_num_batched_tokens)
        for request in list(self.running):
            if request.num_pending_causal == 0:
                self._try_denoise(request, plan)
        for request in list(self.running):
            if request.num_pending_causal > 0 and request.status is RequestStatus.RUNNING:
                self._schedule_causal(request, plan)
        self._admit(plan)
        self._schedule_tails(plan)
        self.last_step = plan.composition
        dropped, self._dropped = self._dropped, []
        return SchedulerOutput(plan.causal, plan.denoise, dropped)

    def _try_denoise(self, request: Request, plan: _Plan) -> None:
        if plan.budget < self.canvas_length:
            return
        plan.budget -= self.canvas_length
        plan.composition.num_denoise_canvases += 1
        plan.denoise.append(self._denoise_work(request))

    def _denoise_work(self, request: Request) -> DenoiseWork:
        params = self._step_params[request.request_id]
        new_canvas = None
        if not request.canvas_started:
            pinned = request.params.pinned_canvas if request.canvas_index == 0 else None
            new_canvas = NewCanvas(
                request.seed,
                request.canvas_index,
                params.stability_threshold,
                pinned,
                commit_spec(request, self.config),
            )
            request.canvas_started = True
        return DenoiseWork(
            request.request_id,
            request.num_computed_tokens,
            self._tables(request),
            params,
            new_canvas,
            request.want_canvas,
            request.lora_id,
        )

    def _tables(self, request: Request) -> dict[str, list[int]]:
        return {g: self.kv.block_table(request.request_id, g) for g in self.kv.group_names}

    def _schedule_causal(self, request: Request, plan: _Plan) -> None:
        """Schedule the next chunk of the request's pending causal tokens (none when the budget is spent
        or the request itself had to be preempted to make room)."""
        num_tokens = min(request.num_pending_causal, plan.budget)
        if num_tokens == 0 or not self._make_room(request, num_tokens, plan):
            return
        start = request.num_computed_tokens
        chunk = tuple(request.cache_token_ids[start : start + num_tokens])
        num_prompt = max(0, min(len(request.prompt_token_ids) - start, num_tokens))
        plan.composition.num_prefill_tokens += num_prompt
        plan.composition.num_commit_tokens += num_tokens - num_prompt
        plan.causal.append(
            CausalWork(request.request_id, chunk, start, self._tables(request), request.lora_id)
        )
        plan.budget -= num_tokens
        request.num_computed_tokens += num_tokens
        if request.num_pending_causal == 0:
            self._try_denoise(request, plan)

    def _make_room(self, request: Request, num_tokens: int, plan: _Plan) -> bool:
        """Allocate blocks for the chunk, preempting the newest running requests if needed.

        Returns False when `request` itself had to be preempted (it was the newest).
        """
        target = request.num_computed_tokens + num_tokens
        while not self.kv.can_allocate(request.request_id, target):
            if self.tails:
                self._drop_tail(next(iter(self.tails)))
                continue
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return False
        self.kv.allocate(request.request_id, target)
        return True

    def _preempt(self, request: Request, plan: _Plan) -> None:
        """Free the request's blocks and queue it first for recomputation; unschedule its work."""
        self._unschedule(request, plan)
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.canvas_started = False
        request.num_preemptions += 1
        plan.composition.num_preempted += 1
        self._dropped.append(request.request_id)
        self.waiting.appendleft(request)

    def _unschedule(self, request: Request, plan: _Plan) -> None:
        """Take the request's work out of the plan, giving back its budget and its composition counts."""
        for causal in [c for c in plan.causal if c.request_id == request.request_id]:
            num_prompt = max(0, min(len(request.prompt_token_ids) - causal.start_pos, len(causal.token_ids)))
            plan.composition.num_prefill_tokens -= num_prompt
            plan.composition.num_commit_tokens -= len(causal.token_ids) - num_prompt
            plan.budget += len(causal.token_ids)
        num_denoise = sum(d.request_id == request.request_id for d in plan.denoise)
        plan.composition.num_denoise_canvases -= num_denoise
        plan.budget += self.canvas_length * num_denoise
        plan.causal = [c for c in plan.causal if c.request_id != request.request_id]
        plan.denoise = [d for d in plan.denoise if d.request_id != request.request_id]

    def _admit(self, plan: _Plan) -> None:
        """Start waiting requests in order while sequences, budget and blocks allow; a request whose
        adapter would exceed `max_loras` distinct adapters among the running waits, passed a bounded
        number of times (`engine.lora.admission`)."""
        while self.waiting and len(self.running) < self.config.max_num_seqs and plan.budget > 0:
            pick = pick_admissible(
                self.waiting, self.running, self.config.max_loras, self.config.max_num_seqs
            )
            if pick is None:
                return
            request = pick.request
            hit = self._cache_hit(request)
            num_tokens = min(request.num_pending_causal - hit.num_tokens, plan.budget)
            if not self.kv.can_allocate(request.request_id, hit.num_tokens + num_tokens, hit):
                if self.tails:
                    self._drop_tail(next(iter(self.tails)))
                    continue  # look the hit up again: the pools changed
                return
            self.waiting.remove(request)
            pick.admitted()
            self.kv.allocate(request.request_id, hit.num_tokens + num_tokens, hit)
            self._count_hit(request, hit, plan)
            request.status = RequestStatus.RUNNING
            request.scheduled_time = time.monotonic()
            self.running.append(request)
            self._schedule_causal(request, plan)

    def _cache_hit(self, request: Request) -> CacheHit:
        """The longest usable cached head of a waiting request's cache tokens, one token short of all."""
        if not self.config.enable_prefix_caching:
            return CacheHit.none(self.kv.group_names)
        tokens = request.cache_token_ids
        return self.kv.find_cached_prefix(tokens, len(tokens) - 1, request.cache_key)

    def _count_hit(self, request: Request, hit: CacheHit, plan: _Plan) -> None:
        """Start the request after its hit; its first admission's prompt hit goes to its usage."""
        request.num_computed_tokens = hit.num_tokens
        if request.num_cached_tokens is None:
            request.num_cached_tokens = min(hit.num_tokens, len(request.prompt_token_ids))
        if self.config.enable_prefix_caching:
            plan.composition.num_prefix_queries += len(request.prompt_token_ids) + len(
                request.committed_token_ids
            )
            plan.composition.num_prefix_hits += hit.num_tokens

    # -- cache tails -----------------------------------------------------------------------------

    def _schedule_tails(self, plan: _Plan) -> None:
        """Write cache tails, oldest first, in the budget left: at most one canvas of tokens in a step
        with request work (which they would slow), the whole budget in a step without (an offline batch
        that ended together drains its tails in a few steps). A tail whose blocks cannot be allocated is
        dropped (it never preempts anything)."""
        room = min(plan.budget, self.canvas_length) if plan.causal or plan.denoise else plan.budget
        for tail in list(self.tails.values()):
            num_tokens = min(tail.num_pending, room)
            if num_tokens == 0:
                return
            start, target = tail.num_computed_tokens, tail.num_computed_tokens + num_tokens
            if not self.kv.can_allocate(tail.request_id, target):
                self._drop_tail(tail.request_id)
                continue
            self.kv.allocate(tail.request_id, target)
            tables = {g: self.kv.block_table(tail.request_id, g) for g in self.kv.group_names}
            chunk = tuple(tail.token_ids[start:target])
            plan.causal.append(CausalWork(tail.request_id, chunk, start, tables))
            plan.budget -= num_tokens
            room -= num_tokens
            plan.composition.num_tail_tokens += num_tokens
            tail.num_computed_tokens = target

    def _advance_tail(self, tail: CacheTail) -> None:
        """After a step wrote the tail's positions: register its full blocks; free it once complete."""
        self.kv.cache_blocks(tail.request_id, tail.token_ids, tail.num_computed_tokens, tail.cache_key)
        if tail.num_pending == 0:
            self._drop_tail(tail.request_id)
        else:
            self.kv.release_out_of_window(tail.request_id, tail.num_computed_tokens)

    def _drop_tail(self, request_id: str) -> None:
        """Forget a tail and free its blocks (those registered stay cached)."""
        del self.tails[request_id]
        self.kv.free(request_id)

    def _release(self, request: Request, repeated: list[int] | None) -> None:
        """Free the blocks of a request leaving the running list, or keep them as its cache tail.

        `repeated`: the tokens of its last canvas a next prompt repeats, for a request that finished
        (None: aborted, which leaves a tail only of committed canvases, once its prompt is written).
        A request on a LoRA adapter leaves none: its adapter may be unloaded, or lack a slot, by the
        time the tail would run, and its K/V must come from the adapter's weights.
        """
        tail = None
        wanted = self.config.enable_prefix_caching and self.config.cache_final_canvas
        wanted = wanted and request.lora_id is None
        if wanted and (repeated is not None or request.num_computed_tokens >= len(request.prompt_token_ids)):
            tail = cache_tail(request, repeated or [], self.kv.block_size)
        if tail is None:
            self.kv.free(request.request_id)
        else:
            self.tails[request.request_id] = tail

    # -- results ---------------------------------------------------------------------------------

    def update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Apply one step's results; returns the events to deliver to clients."""
        for causal in scheduled.causal:
            request = self.requests.get(causal.request_id)
            if request is not None and request.status is RequestStatus.RUNNING:
                if self.config.enable_prefix_caching:
                    self.kv.cache_blocks(
                        causal.request_id,
                        request.cache_token_ids,
                        request.num_computed_tokens,
                        request.cache_key,
                    )
                self.kv.release_out_of_window(causal.request_id, request.num_computed_tokens)
            elif causal.request_id in self.tails:  # a tail, or the in-flight work of a request that left
                self._advance_tail(self.tails[causal.request_id])
        outputs = []
        for denoise in scheduled.denoise:
            request = self.requests.get(denoise.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted after this step was scheduled
            event = self._apply_outcome(request, result.outcomes[denoise.request_id])
            if event is not None:
                outputs.append(event)
        return outputs

    def _apply_outcome(self, request: Request, outcome: DenoiseOutcome) -> RequestOutput | None:
        request.denoise_steps += 1
        snapshot = _snapshot(request, outcome) if request.want_canvas else None
        if not outcome.finished:
            return (
                RequestOutput(request.request_id, canvas=snapshot, lora_name=request.lora_name)
                if snapshot
                else None
            )
        assert outcome.argmax is not None, "a finished canvas must come with its argmax"
        return self._end_canvas(request, outcome, outcome.argmax, snapshot)

    def _end_canvas(
        self, request: Request, outcome: DenoiseOutcome, canvas: list[int], snapshot: CanvasSnapshot | None
    ) -> RequestOutput:
        params = request.params
        assert params.max_tokens is not None and params.stop_token_ids is not None
        end = end_canvas(canvas, len(request.output_token_ids), params.max_tokens, params.stop_token_ids)
        request.output_token_ids += end.new_token_ids
        request.steps_per_canvas.append(outcome.step)
        logprobs = end.logprobs_of(outcome.logprobs)
        if request.first_token_time is None and end.new_token_ids:
            request.first_token_time = time.monotonic()
        if end.finish_reason is not None:
            finished = self._finish(request, end.finish_reason, repeated_tokens(canvas, end))
            return RequestOutput(
                request.request_id,
                end.new_token_ids,
                canvas=snapshot,
                finish_reason=end.finish_reason,
                usage=finished.usage,
                logprobs=logprobs,
                lora_name=request.lora_name,
            )
        request.committed_token_ids += canvas
        request.canvas_index += 1
        request.canvas_started = False
        return RequestOutput(
            request.request_id,
            end.new_token_ids,
            canvas=snapshot,
            usage=usage_of(request),
            logprobs=logprobs,
            lora_name=request.lora_name,
        )

    def _finish(
        self, request: Request, reason: FinishReason, repeated: list[int] | None = None
    ) -> RequestOutput:
        """Mark done, free blocks (or keep them as a cache tail: `_release`), forget the request; the
        runner drops its canvas on the next step."""
        if request in self.running:
            self.running.remove(request)
            self._release(request, repeated)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        self._step_params.pop(request.request_id, None)
        self._dropped.append(request.request_id)
        self.newly_finished.append(request)
        return RequestOutput(
            request.request_id, finish_reason=reason, usage=usage_of(request), lora_name=request.lora_name
        )


def context_error(
    num_prompt: int, asked: str, needed: int, max_model_len: int, param: str = "prompt"
) -> InvalidParams:
    """The error of a request whose prompt plus output (`asked`, `needed` positions) exceeds the context.

    Example: "This model's maximum context length is 128 tokens: a prompt of 120 tokens plus
    max_tokens=9 (whole canvases of 8) needs 136 positions, and max_model_len is 128: shorten the prompt
    or lower max_tokens".
    """
    fix = "shorten the prompt or lower max_tokens" if param == "max_tokens" else "shorten the prompt"
    return InvalidParams(
        f"This model's maximum context length is {max_model_len} tokens: a prompt of {num_prompt} tokens "
        f"plus {asked} needs {needed} positions, and max_model_len is {max_model_len}: {fix}",
        param,
    )


def usage_of(request: Request) -> Usage:
    return Usage(
        prompt_tokens=len(request.prompt_token_ids),
        completion_tokens=len(request.output_token_ids),
        denoise_steps=request.denoise_steps,
        canvases=len(request.steps_per_canvas),
        steps_per_canvas=tuple(request.steps_per_canvas),
        cached_tokens=request.num_cached_tokens or 0,
    )


def _snapshot(request: Request, outcome: DenoiseOutcome) -> CanvasSnapshot | None:
    if outcome.argmax is None:
        return None
    return CanvasSnapshot(
        canvas_index=request.canvas_index,
        step=outcome.step,
        token_ids=outcome.argmax,
        confidence=outcome.confidence or [],
        num_accepted=outcome.num_accepted,
        mean_entropy=outcome.mean_entropy,
        pinned=outcome.pinned or [],
    )
