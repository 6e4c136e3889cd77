"""The synchronous engine: `step()` = schedule -> execute -> update, plus detokenisation and stats.

`Engine` is single-threaded; `engine.async_engine.AsyncEngine` runs it in a background thread for
the server, and `engine.llm.LLM` drives it directly for offline use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import DiffusionDefaults, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager, num_blocks_for
from engine.model.cache_tensors import allocate_layer_caches, bytes_per_block, cache_groups
from engine.model.diffusion_gemma import DiffusionGemma
from engine.request import InvalidParams, RequestOutput, SamplingParams
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.stats import EngineStats, StepTiming


@dataclass(frozen=True)
class EngineConfig:
    """How one engine uses its model and memory. Every field has a serving default."""

    max_num_seqs: int = 16
    """Canvases in flight at most (running requests)."""
    max_num_batched_tokens: int = 4096
    """Tokens per forward; each denoised canvas counts its canvas_length."""
    max_waiting: int = 1024
    """Bound of the waiting queue; beyond it requests are refused (HTTP 429)."""
    max_model_len: int | None = None
    """Positions per request (prompt + every canvas); None: the model's max_position_embeddings."""
    block_size: int = 16
    """Positions per KV cache block."""
    num_full_blocks: int | None = None
    """Blocks of the full-attention cache group; None: enough for max_num_seqs requests of
    max_model_len, unless `kv_cache_bytes` caps it."""
    kv_cache_bytes: int | None = None
    """Total K/V budget across groups; None: no cap (see `num_full_blocks`)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size and max_num_seqs must be >= 1")


def cache_blocks(
    model: ModelConfig, config: EngineConfig, max_model_len: int, dtype: torch.dtype
) -> dict[str, int]:
    """Blocks per cache group.

    Sliding groups need at most a window plus one chunk per running request:
    ceil((W - 1 + max_num_batched_tokens) / block_size) + 1 blocks each. The full group gets
    `num_full_blocks`, else what `kv_cache_bytes` leaves, else room for max_num_seqs full requests.
    """
    blocks: dict[str, int] = {}
    bs = config.block_size
    if "sliding" in model.layer_kinds:
        span = model.sliding_window - 1 + config.max_num_batched_tokens
        blocks["sliding"] = config.max_num_seqs * (num_blocks_for(span, bs) + 1)
    if "full" in model.layer_kinds:
        blocks["full"] = _full_blocks(model, config, max_model_len, dtype, blocks.get("sliding", 0))
    return blocks


def _full_blocks(
    model: ModelConfig, config: EngineConfig, max_model_len: int, dtype: torch.dtype, sliding_blocks: int
) -> int:
    if config.num_full_blocks is not None:
        return config.num_full_blocks
    wanted = config.max_num_seqs * num_blocks_for(max_model_len, config.block_size)
    if config.kv_cache_bytes is None:
        return wanted
    left = config.kv_cache_bytes - sliding_blocks * bytes_per_block(
        model, "sliding", config.block_size, dtype
    )
    affordable = left // bytes_per_block(model, "full", config.block_size, dtype)
    if affordable < num_blocks_for(max_model_len, config.block_size):
        raise ValueError(
            f"kv_cache_bytes={config.kv_cache_bytes} cannot hold one request of "
            f"max_model_len={max_model_len}: raise kv_cache_bytes or lower max_model_len"
        )
    return int(min(wanted, affordable))


class Engine:
    """One model, one scheduler, one runner. Not thread-safe: one caller drives `step()`."""

    def __init__(
        self,
        model: DiffusionGemma,
        defaults: DiffusionDefaults,
        tokenizer: Any | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        model_config = model.config
        self.max_model_len = self.config.max_model_len or model_config.max_position_embeddings
        weight = model.embed_tokens.weight
        blocks = cache_blocks(model_config, self.config, self.max_model_len, weight.dtype)
        caches = allocate_layer_caches(
            model_config, blocks, self.config.block_size, weight.dtype, weight.device
        )
        self.runner = ModelRunner(model, caches)
        self.scheduler = Scheduler(
            SchedulerConfig(
                canvas_length=model_config.canvas_length,
                max_model_len=self.max_model_len,
                max_num_seqs=self.config.max_num_seqs,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_waiting=self.config.max_waiting,
            ),
            KVCacheManager(cache_groups(model_config, blocks), self.config.block_size),
        )
        self.stats = EngineStats()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        want_canvas: bool = False,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request; raises `InvalidParams` or `QueueFull` with a message."""
        config = self.model.config
        resolved = (params or SamplingParams()).resolve(self.defaults)
        resolved.check_canvas(config.canvas_length, config.vocab_size)
        bad = next((t for t in prompt_token_ids if not 0 <= t < config.vocab_size), None)
        if bad is not None:
            raise InvalidParams(f"prompt token id {bad} is outside the vocabulary [0, {config.vocab_size})")
        self.scheduler.add_request(request_id, prompt_token_ids, resolved, want_canvas, arrival_time)
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer)

    def abort(self, request_id: str) -> RequestOutput | None:
        output = self.scheduler.abort(request_id)
        return None if output is None else self._finalise([output])[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the events for clients (text filled in)."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        t1 = time.perf_counter()
        result = self.runner.execute(scheduled)
        t2 = time.perf_counter()
        outputs = self._finalise(self.scheduler.update(scheduled, result))
        t3 = time.perf_counter()
        committed = sum(len(o.new_token_ids) for o in outputs)
        timing = StepTiming(t1 - t0, t2 - t1, t3 - t2)
        self.stats.record_step(self.scheduler.last_step, timing, committed, scheduled.request_ids)
        return outputs

    def _finalise(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Detokenise, count committed tokens, record finished requests, refresh gauges."""
        finalised = []
        for output in outputs:
            self.stats.num_committed_tokens += len(output.new_token_ids)
            detokenizer = self._detokenizers.get(output.request_id)
            text = detokenizer.push(output.new_token_ids, output.finished) if detokenizer else ""
            if output.finished:
                self._detokenizers.pop(output.request_id, None)
            finalised.append(replace(output, new_text=text) if text else output)
        now = time.monotonic()
        for request in self.scheduler.newly_finished:
            self.stats.record_finished(request, now)
        self.scheduler.newly_finished.clear()
        self._refresh_gauges()
        return finalised

    def _refresh_gauges(self) -> None:
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.kv_usage = self.scheduler.kv.usage()
