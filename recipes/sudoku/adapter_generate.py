"""`engine.generate.generate` with a LoRA adapter: the same engine sizing, LoRA on, every request on it.

The adapter is served as the server serves it (`Engine.add_lora`, requests with `lora_name`): the base
weights stay the checkpoint's, the encoder-side deltas run on the causal passes and the decoder-side
ones on the denoise passes (`engine.lora`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from engine.config import DiffusionDefaults
from engine.engine import Engine
from engine.generate import lockstep_config
from engine.llm import LLM, GenerationResult
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
    (loaded under its directory's name, `max_lora_rank` its rank). The engine serves a copy of `model`
    (enabling LoRA wraps the model's modules), so `model` stays plain for the next call."""
    config = replace(
        lockstep_config(model, defaults, prompts, params, block_size),
        enable_lora=True,
        max_lora_rank=read_peft_config(adapter_dir).r,
    )
    engine = Engine(copy.deepcopy(model), defaults, None, config)  # LoRA wraps the model it serves
    engine.add_lora(adapter_dir.name, str(adapter_dir))
    return LLM(engine).generate(list(prompts), params, lora_name=adapter_dir.name)
