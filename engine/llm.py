"""Offline generation through the same scheduler and runner as the server.

`LLM(engine).generate(prompts, params)` queues every prompt and steps the engine until all finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.model.loader import load_checkpoint
from engine.request import (
    CanvasSnapshot,
    FinishReason,
    InvalidParams,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)

CanvasCallback = Callable[[int, CanvasSnapshot], None]
"""Called after every denoise step with (prompt index, canvas snapshot)."""
Prompt = str | list[int]


@dataclass
class GenerationResult:
    """One prompt's output. `steps_per_canvas` counts denoise steps of each finished canvas."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    """One entry per output token, when the request asked for logprobs."""

    @property
    def steps_per_canvas(self) -> list[int]:
        return list(self.usage.steps_per_canvas) if self.usage else []

    def add(self, output: RequestOutput) -> None:
        self.token_ids += output.new_token_ids
        self.text += output.new_text
        if output.logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.logprobs
        if output.finished:
            self.finish_reason, self.usage = output.finish_reason, output.usage


class LLM:
    """Offline generation on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._next_id = 0

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: EngineConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> LLM:
        checkpoint = load_checkpoint(path, dtype=dtype, device=device)
        return cls(Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        callback: CanvasCallback | None = None,
        lora_name: str | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids); results in prompt order. `lora_name`: every
        request on that loaded adapter (`Engine.add_lora`; None: the base model)."""
        batch = _as_batch(prompts)
        params_list = per_prompt(params, len(batch))
        want_canvas = callback is not None
        ids = {
            self._add(self._tokens(prompt), sp, want_canvas, lora_name): i
            for i, (prompt, sp) in enumerate(zip(batch, params_list, strict=True))
        }
        results = [GenerationResult() for _ in batch]
        while self.engine.has_unfinished():
            for output in self.engine.step():
                index = ids[output.request_id]
                results[index].add(output)
                if callback is not None and output.canvas is not None:
                    callback(index, output.canvas)
        return results

    def _add(
        self, prompt: list[int], params: SamplingParams, want_canvas: bool, lora_name: str | None
    ) -> str:
        request_id = f"offline-{self._next_id}"
        self._next_id += 1
        self.engine.add_request(request_id, prompt, params, want_canvas, lora_name=lora_name)
        return request_id

    def _tokens(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.engine.tokenizer is None:
            raise InvalidParams("this engine has no tokenizer: pass token ids")
        return list(self.engine.tokenizer(prompt).input_ids)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or a token id list) or a sequence of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [[int(t) for t in items]]  # type: ignore[arg-type]
    return items  # type: ignore[return-value]


def per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if len(params) != count:
        raise InvalidParams(f"{len(params)} SamplingParams for {count} prompts")
    return list(params)
