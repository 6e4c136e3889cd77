"""A minimal offline `generate` for one or a few requests, on the runner the scheduler will drive.

Per request: prefill the prompt (causal) -> denoise the canvas until the sampler stops it -> take the
argmax canvas, cut at the first stop id and at `max_tokens` -> if not finished, commit the canvas
(causal pass at its positions) and start the next block. Requests advance together: each step is one
forward holding every request's causal work and denoise pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from engine.config import DiffusionDefaults
from engine.kv_cache import KVCacheManager, num_blocks_for
from engine.model.cache_tensors import allocate_layer_caches, cache_groups
from engine.model.diffusion_gemma import DiffusionGemma
from engine.request import InvalidParams, SamplingParams
from engine.runner import CausalWork, DenoiseWork, ModelRunner, RunnerInput
from engine.sampler import StepParams, StepResult

FinishReason = Literal["stop", "length"]
CanvasCallback = Callable[[int, int, StepResult], None]
"""Called after every denoise step with (request index, block index, step result)."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: FinishReason
    steps_per_block: list[int]
    text: str | None = None


@dataclass(frozen=True)
class BlockEnd:
    """What a finished canvas adds to the output, and whether the request is done."""

    new_token_ids: list[int]
    finish_reason: FinishReason | None


def end_block(canvas: list[int], num_output: int, max_tokens: int, stop_ids: tuple[int, ...]) -> BlockEnd:
    """Cut a committed canvas at the first stop id (excluded from the output) and at `max_tokens`.

    Example, max_tokens 10, 6 tokens out, canvas [5, 9, 1, 7] with stop id 1: adds [5, 9], "stop".
    Without a stop id in reach, the canvas is cut to the 4 remaining tokens and the reason is "length".
    """
    remaining = max_tokens - num_output
    stop_at = next((i for i, t in enumerate(canvas) if t in stop_ids), None)
    if stop_at is not None and stop_at < remaining:
        return BlockEnd(canvas[:stop_at], "stop")
    if len(canvas) >= remaining:
        return BlockEnd(canvas[:remaining], "length")
    return BlockEnd(canvas, None)


@dataclass
class _Job:
    """One request's progress through prefill, denoising and commits."""

    index: int
    params: SamplingParams
    seed: int
    pending: list[int]
    num_cached: int = 0
    block: int = 0
    output: list[int] = field(default_factory=list)
    steps_per_block: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return f"offline-{self.index}"


def max_positions(num_prompt: int, max_tokens: int, canvas_length: int) -> int:
    """Cache positions a request may need: its prompt plus every canvas but the last (never committed)."""
    return num_prompt + (num_blocks_for(max_tokens, canvas_length) - 1) * canvas_length


class OfflineGenerator:
    """Owns a runner and a block manager sized for one `generate` call's requests."""

    def __init__(self, model: DiffusionGemma, defaults: DiffusionDefaults, block_size: int = 16) -> None:
        self.model = model
        self.defaults = defaults
        self.block_size = block_size

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        callback: CanvasCallback | None = None,
        tokenizer: Any | None = None,
    ) -> list[GenerationResult]:
        jobs = self._jobs(prompts, params)
        kv, runner = self._allocate(jobs)
        active = list(jobs)
        while active:
            self._step(active, kv, runner, callback)
            active = [j for j in active if j.finish_reason is None]
        return [self._result(j, tokenizer) for j in jobs]

    def _jobs(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None
    ) -> list[_Job]:
        per_request = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(per_request) != len(prompts):
            raise InvalidParams(f"{len(per_request)} SamplingParams for {len(prompts)} prompts")
        config = self.model.config
        jobs = []
        for i, (prompt, p) in enumerate(zip(prompts, per_request, strict=True)):
            resolved = p.resolve(self.defaults)
            resolved.check_canvas(config.canvas_length, config.vocab_size)
            self._check_prompt(prompt, resolved)
            seed = resolved.seed if resolved.seed is not None else random.getrandbits(62)
            jobs.append(_Job(index=i, params=resolved, seed=seed, pending=list(prompt)))
        return jobs

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        config = self.model.config
        if not prompt:
            raise InvalidParams("prompt is empty: give at least one token")
        if any(not 0 <= t < config.vocab_size for t in prompt):
            raise InvalidParams(f"prompt holds a token id outside [0, {config.vocab_size})")
        assert params.max_tokens is not None
        needed = max_positions(len(prompt), params.max_tokens, config.canvas_length) + config.canvas_length
        if needed > config.max_position_embeddings:
            raise InvalidParams(
                f"prompt ({len(prompt)} tokens) plus max_tokens={params.max_tokens} needs {needed} "
                f"positions; the model has {config.max_position_embeddings}: "
                "shorten the prompt or lower max_tokens"
            )

    def _allocate(self, jobs: list[_Job]) -> tuple[KVCacheManager, ModelRunner]:
        config = self.model.config
        num = sum(
            num_blocks_for(
                max_positions(len(j.pending), j.params.max_tokens or 1, config.canvas_length), self.block_size
            )
            for j in jobs
        )
        blocks: dict[str, int] = {kind: max(num, 1) for kind in set(config.layer_kinds)}
        weight = self.model.embed_tokens.weight
        caches = allocate_layer_caches(config, blocks, self.block_size, weight.dtype, weight.device)
        return KVCacheManager(cache_groups(config, blocks), self.block_size), ModelRunner(self.model, caches)

    def _step(
        self, jobs: list[_Job], kv: KVCacheManager, runner: ModelRunner, callback: CanvasCallback | None
    ) -> None:
        work = RunnerInput()
        for job in jobs:
            if job.pending:
                work.causal.append(self._causal_work(job, kv))
            work.denoise.append(self._denoise_work(job, kv, runner))
        output = runner.execute(work)
        for job in jobs:
            kv.release_out_of_window(job.request_id, job.num_cached)
            result = output.results[job.request_id]
            if callback is not None:
                callback(job.index, job.block, result)
            if result.finished:
                self._end_block(job, runner, kv)

    def _causal_work(self, job: _Job, kv: KVCacheManager) -> CausalWork:
        kv.allocate(job.request_id, job.num_cached + len(job.pending))
        tables = {g: kv.block_table(job.request_id, g) for g in kv.group_names}
        work = CausalWork(job.request_id, tuple(job.pending), job.num_cached, tables)
        job.num_cached += len(job.pending)
        job.pending = []
        return work

    @staticmethod
    def _denoise_work(job: _Job, kv: KVCacheManager, runner: ModelRunner) -> DenoiseWork:
        if job.request_id not in runner.canvases:
            stability = job.params.stability_threshold or 0
            pinned = job.params.pinned_canvas if job.block == 0 else None
            runner.start_canvas(job.request_id, job.seed, job.block, stability, pinned)
        tables = {g: kv.block_table(job.request_id, g) for g in kv.group_names}
        return DenoiseWork(job.request_id, job.num_cached, tables, StepParams.from_sampling(job.params))

    def _end_block(self, job: _Job, runner: ModelRunner, kv: KVCacheManager) -> None:
        state = runner.canvas(job.request_id)
        canvas = [int(t) for t in state.argmax.tolist()]
        job.steps_per_block.append(state.step)
        runner.drop_canvas(job.request_id)
        assert job.params.max_tokens is not None and job.params.stop_token_ids is not None
        end = end_block(canvas, len(job.output), job.params.max_tokens, job.params.stop_token_ids)
        job.output += end.new_token_ids
        job.finish_reason = end.finish_reason
        if end.finish_reason is None:
            job.pending = canvas
            job.block += 1
        else:
            kv.free(job.request_id)

    @staticmethod
    def _result(job: _Job, tokenizer: Any | None) -> GenerationResult:
        assert job.finish_reason is not None
        text = tokenizer.decode(job.output) if tokenizer is not None else None
        return GenerationResult(job.output, job.finish_reason, job.steps_per_block, text)


@torch.inference_mode()
def generate(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams] | None = None,
    callback: CanvasCallback | None = None,
    tokenizer: Any | None = None,
    block_size: int = 16,
) -> list[GenerationResult]:
    """Generate for a few tokenised prompts; see `OfflineGenerator`."""
    return OfflineGenerator(model, defaults, block_size).generate(prompts, params, callback, tokenizer)
