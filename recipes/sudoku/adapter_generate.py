"""`engine.generate.generate` with a LoRA adapter: the same engine sizing, LoRA on, every request on it.

The adapter is served as the server serves it (`Engine.add_lora`, requests with `lora_name`): the base
weights stay the checkpoint's, the encoder-side deltas run on the causal passes and the decoder-side
ones on the denoise passes (`engine.lora`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.config import DiffusionDefaults
from engine.engine import Engine
from engine.engine_config import EngineConfig, batched_tokens_for
from engine.llm import GenerationResult, per_prompt
from engine.lora.peft_config import read_peft_config
from engine.model.diffusion_gemma import DiffusionGemma
from engine.request import SamplingParams


def generate_with_adapter(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    prompts: Sequence[list[int]],
    params: SamplingParams | Sequence[SamplingParams] | None,
    adapter_dir: Path,
    block_size: int = 16,
) -> list[GenerationResult]:
    """Token-id prompts -> results in prompt order, every request on the adapter at `adapter_dir`
    (loaded under its directory's name, `max_lora_rank` its rank)."""
    canvas = model.config.canvas_length
    count = max(len(prompts), 1)
    params_list = per_prompt(params, len(prompts))
    max_tokens = max(p.resolve(defaults).max_tokens or 1 for p in params_list)
    longest = max((len(p) for p in prompts), default=1)
    config = EngineConfig(
        max_num_seqs=count,
        max_num_batched_tokens=batched_tokens_for(count, canvas, prefill_chunk=sum(len(p) for p in prompts)),
        block_size=block_size,
        max_waiting=count,
        max_model_len=min(longest + -(-max_tokens // canvas) * canvas, model.config.max_position_embeddings),
        enable_lora=True,
        max_lora_rank=read_peft_config(adapter_dir).r,
    )
    engine = Engine(model, defaults, None, config)
    name = adapter_dir.name
    engine.add_lora(name, str(adapter_dir))
    index = {}
    for i, (prompt, sp) in enumerate(zip(prompts, params_list, strict=True)):
        engine.add_request(f"adapter-{i}", list(prompt), sp, lora_name=name)
        index[f"adapter-{i}"] = i
    results = [GenerationResult() for _ in prompts]
    while engine.has_unfinished():
        for output in engine.step():
            results[index[output.request_id]].add(output)
    return results
