"""The synchronous engine: `step()` = schedule -> execute -> update, plus detokenisation and stats.

`Engine` is single-threaded; `engine.async_engine.AsyncEngine` runs it in a background thread for
the server, and `engine.llm.LLM` drives it directly for offline use.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from engine.config import DiffusionDefaults, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_config import EngineConfig
from engine.guided import GrammarCompiler
from engine.kv_cache import KVCacheManager, num_blocks_for
from engine.lora.errors import LoRAError, UnknownLoRA
from engine.lora.manager import LoRAManager
from engine.model.cache_tensors import allocate_layer_caches, bytes_per_block, cache_groups
from engine.model.diffusion_gemma import DiffusionGemma
from engine.request import FinishReason, InvalidParams, RequestOutput, SamplingParams, check_prompt_ids
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, context_error
from engine.stats import EngineStats, StepTiming


def cache_blocks(model: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> dict[str, int]:
    """Blocks per cache group, for a `config` resolved against `model`.

    Sliding groups need at most a window plus one chunk per running request:
    ceil((W - 1 + max_num_batched_tokens) / block_size) + 1 blocks each. The full group gets
    `num_full_blocks`, else what `kv_cache_bytes` leaves, else room for max_num_seqs full requests.
    """
    blocks: dict[str, int] = {}
    bs = config.block_size
    if "sliding" in model.layer_kinds:
        span = model.sliding_window - 1 + config.resolved_max_num_batched_tokens
        blocks["sliding"] = config.max_num_seqs * (num_blocks_for(span, bs) + 1)
    if "full" in model.layer_kinds:
        blocks["full"] = _full_blocks(model, config, dtype, blocks.get("sliding", 0))
    return blocks


def _full_blocks(model: ModelConfig, config: EngineConfig, dtype: torch.dtype, sliding_blocks: int) -> int:
    if config.num_full_blocks is not None:
        return config.num_full_blocks
    max_model_len = config.resolved_max_model_len
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
        detokenize: bool = True,
    ) -> None:
        """`tokenizer` compiles grammars and, with `detokenize`, turns outputs into text here. The
        engine core process keeps the tokenizer for grammars but leaves text to the API process."""
        self.model = model
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.detokenize = detokenize
        model_config = model.config
        self.config = (config or EngineConfig()).resolve(
            model_config.canvas_length, model_config.max_position_embeddings
        )
        SamplingParams().resolve(defaults)  # the defaults obey the request ranges, or InvalidParams now
        weight = model.embed_tokens.weight
        blocks = cache_blocks(model_config, self.config, weight.dtype)
        caches = allocate_layer_caches(
            model_config, blocks, self.config.block_size, weight.dtype, weight.device
        )
        self.grammars = GrammarCompiler(tokenizer, model_config.vocab_size, defaults.eos_token_ids)
        self.lora = self._lora_manager(model)
        if self.config.compile:
            from engine.model.compiled import compile_layers  # imports torch._dynamo: only when asked

            compile_layers(model)
        self.runner = ModelRunner(model, caches, self.grammars, self.lora, compiled=self.config.compile)
        self.scheduler = Scheduler(
            self.config,
            model_config.canvas_length,
            KVCacheManager(cache_groups(model_config, blocks), self.config.block_size),
        )
        self.stats = EngineStats()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def _lora_manager(self, model: DiffusionGemma) -> LoRAManager | None:
        if not self.config.enable_lora:
            return None
        config = self.config
        return LoRAManager(model, config.max_loras, config.max_lora_rank, config.resolved_max_cpu_loras)

    # -- LoRA adapters (public: `EngineClient.call_utility("add_lora", name, path)` reaches them) ------

    def add_lora(self, name: str, path: str) -> None:
        """Load the PEFT LoRA adapter at `path` as `name`; requests then pick it by `lora_name`.

        Raises `LoRAError` naming the file, tensor or field at fault (and when LoRA is off, the name is
        taken, or `max_cpu_loras` adapters are loaded).
        """
        self._require_lora().add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload `name`: no new request may use it from now on (`UnknownLoRA`); it is freed at once, or
        when its last request in flight finishes. It is unloaded once `list_loras()` no longer names it.
        Raises `UnknownLoRA` for a name that is not loaded (or already unloading)."""
        self._require_lora().remove(name)

    def list_loras(self) -> list[str]:
        """The adapters loaded, sorted (an unloading one until its last request finishes)."""
        return [] if self.lora is None else self.lora.names()

    def _require_lora(self) -> LoRAManager:
        if self.lora is None:
            raise LoRAError("LoRA is off in this engine: start it with enable_lora=True (--enable-lora)")
        return self.lora

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        want_canvas: bool = False,
        arrival_time: float | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Validate and queue a request; raises `InvalidParams`, `QueueFull` or `UnknownLoRA` with a message.

        The one place a request is checked: `SamplingParams` checks its own fields, this the prompt's ids,
        the pinned canvas, the default max_tokens and the adapter (`lora_name`, None: the base model),
        the scheduler the context and the cache.
        """
        config = self.model.config
        check_prompt_ids(prompt_token_ids, config.vocab_size)
        resolved = self._resolve(params or SamplingParams(), len(prompt_token_ids))
        resolved.check_canvas(config.canvas_length, config.vocab_size)
        self._check_grammar(resolved)
        if lora_name is None:
            self.scheduler.add_request(request_id, prompt_token_ids, resolved, want_canvas, arrival_time)
        else:
            self._add_with_lora(request_id, prompt_token_ids, resolved, want_canvas, arrival_time, lora_name)
        if self.detokenize:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer)

    def _add_with_lora(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        want_canvas: bool,
        arrival_time: float | None,
        lora_name: str,
    ) -> None:
        if self.lora is None:
            raise UnknownLoRA(f"LoRA adapter {lora_name!r} is not loaded: this engine runs without LoRA")
        adapter = self.lora.acquire(lora_name)
        try:
            self.scheduler.add_request(
                request_id, prompt_token_ids, params, want_canvas, arrival_time, lora_name, adapter.load_id
            )
        except BaseException:
            self.lora.release(adapter.load_id)
            raise

    def _check_grammar(self, params: SamplingParams) -> None:
        """A grammar compiles (cached for the runner) and has a stop id to end on; else `InvalidParams`."""
        if params.grammar is None:
            return
        if not params.stop_token_ids:
            raise InvalidParams(
                "a grammar-constrained request needs a stop token id to end on", "stop_token_ids"
            )
        self.grammars.compile(params.grammar)

    @property
    def max_model_len(self) -> int:
        """Positions per request: the config's, else the model's max_position_embeddings."""
        return self.config.resolved_max_model_len

    def _resolve(self, params: SamplingParams, num_prompt: int) -> SamplingParams:
        """Unset fields take the checkpoint's defaults; an unset max_tokens takes the default cut to the
        whole canvases left in the context (the client did not ask for more, so a long prompt still fits).
        """
        if params.max_tokens is None:
            canvas = self.model.config.canvas_length
            room = (self.max_model_len - num_prompt) // canvas * canvas
            if room < 1:
                raise context_error(
                    num_prompt, f"one canvas of {canvas}", num_prompt + canvas, self.max_model_len
                )
            params = replace(params, max_tokens=min(self.defaults.max_new_tokens, room))
        return params.resolve(self.defaults)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> RequestOutput | None:
        """End a request in any state (`Scheduler.abort`); None if it is unknown or already done."""
        output = self.scheduler.abort(request_id, reason)
        return None if output is None else self._finalise([output])[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, so that later requests compute their prompts again (vLLM's
        `reset_prefix_cache`); blocks of running requests stay theirs. False when prefix caching is off.
        Call it from the thread that drives `step()`."""
        if not self.config.enable_prefix_caching:
            return False
        self.scheduler.kv.reset_prefix_cache()
        return True

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the events for clients (text filled in)."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        t1 = time.perf_counter()
        result = self.runner.execute(scheduled)
        t2 = time.perf_counter()
        outputs = self._finalise(self.scheduler.update(scheduled, result))
        t3 = time.perf_counter()
        num_output = sum(len(o.new_token_ids) for o in outputs)
        timing = StepTiming(t1 - t0, t2 - t1, t3 - t2)
        self.stats.record_step(self.scheduler.last_step, timing, num_output, scheduled.request_ids)
        return outputs

    def _finalise(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Detokenise, count committed tokens, record finished requests, refresh gauges."""
        finalised = []
        for output in outputs:
            self.stats.num_output_tokens += len(output.new_token_ids)
            detokenizer = self._detokenizers.get(output.request_id)
            text = detokenizer.push(output.new_token_ids, output.finished) if detokenizer else ""
            if output.finished:
                self._detokenizers.pop(output.request_id, None)
            finalised.append(replace(output, new_text=text) if text else output)
        now = time.monotonic()
        for request in self.scheduler.newly_finished:
            self.stats.record_finished(request, now)
            if self.lora is not None and request.lora_id is not None:
                self.lora.release(request.lora_id)
        self.scheduler.newly_finished.clear()
        self._refresh_gauges()
        return finalised

    def _refresh_gauges(self) -> None:
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.kv_usage = self.scheduler.kv.usage()
