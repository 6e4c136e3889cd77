"""One-call offline generation for a few prompts (tests, the CLI, recipes).

Builds an `Engine` sized so that every prompt advances in every step, and runs it through `LLM`: the
same scheduler and runner as the server, no second loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import DiffusionDefaults
from engine.engine import Engine
from engine.engine_config import EngineConfig, batched_tokens_for
from engine.llm import LLM, CanvasCallback, GenerationResult, Prompt, per_prompt
from engine.model.diffusion_gemma import DiffusionGemma
from engine.request import SamplingParams


def generate(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    callback: CanvasCallback | None = None,
    tokenizer: object | None = None,
    block_size: int = 16,
) -> list[GenerationResult]:
    """Generate for a few prompts with an engine sized so they all advance together every step."""
    config = lockstep_config(model, defaults, prompts, params, block_size)
    return LLM(Engine(model, defaults, tokenizer, config)).generate(list(prompts), params, callback)


def lockstep_config(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None,
    block_size: int = 16,
) -> EngineConfig:
    """Limits under which every prompt is admitted at once and advances in every step."""
    canvas = model.config.canvas_length
    count = max(len(prompts), 1)
    max_tokens = max(p.resolve(defaults).max_tokens or 1 for p in per_prompt(params, len(prompts)))
    longest = max((len(p) for p in prompts), default=1)
    return EngineConfig(
        max_num_seqs=count,
        max_num_batched_tokens=batched_tokens_for(count, canvas, prefill_chunk=sum(len(p) for p in prompts)),
        block_size=block_size,
        max_waiting=count,
        max_model_len=min(longest + -(-max_tokens // canvas) * canvas, model.config.max_position_embeddings),
    )
