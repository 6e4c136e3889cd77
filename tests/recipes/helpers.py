"""Tiny Sudoku-layout checkpoints for recipe tests (seconds to build, never the shipped model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.attention.types import LayerCache, Segment
from engine.model.cache_tensors import allocate_layer_caches
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from recipes.sudoku.checkpoint import init_checkpoint
from recipes.sudoku.train import TrainConfig, Trainer

TINY: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    moe_intermediate_size=16,
)


def tiny_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    init_checkpoint(path, seed=seed, **(TINY | overrides))
    return path


def straight_and_resumed(
    config: TrainConfig, init_dir: Path, work: Path, data_dir: Path, steps: int = 4
) -> tuple[Trainer, Trainer]:
    """Two trainers after `steps` steps: one straight through, one saved half-way and resumed."""
    straight = Trainer(config, init_dir, work / "a", work / "a.pt", data_dir)
    for _ in range(steps):
        straight.train_step()
    interrupted = Trainer(config, init_dir, work / "b", work / "b.pt", data_dir)
    for _ in range(steps // 2):
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(config, init_dir, work / "b", work / "b.pt", data_dir)
    resumed.resume()
    assert resumed.step == steps // 2
    for _ in range(steps - steps // 2):
        resumed.train_step()
    return straight, resumed


def paged_forward(
    model: DiffusionGemma, prompts: torch.Tensor, canvases: torch.Tensor, soft: torch.Tensor | None
) -> torch.Tensor:
    """The engine's forward: each prompt a causal segment, then each canvas a bidirectional one."""
    batch, num_prompt = prompts.shape
    num_canvas = canvases.shape[1]
    block_size = 16
    per_request = -(-(num_prompt + num_canvas) // block_size)
    kinds = set(model.config.layer_kinds)
    caches: list[LayerCache] = allocate_layer_caches(
        model.config, dict.fromkeys(kinds, batch * per_request), block_size, torch.float32, "cpu"
    )
    tables = [{k: list(range(b * per_request, (b + 1) * per_request)) for k in kinds} for b in range(batch)]
    segments = [Segment(num_prompt, 0, True, tables[b]) for b in range(batch)]
    segments += [Segment(num_canvas, num_prompt, False, tables[b]) for b in range(batch)]
    positions = [torch.arange(s.start_pos, s.end_pos) for s in segments]
    forward = ForwardBatch(
        input_ids=torch.cat([prompts.flatten(), canvases.flatten()]),
        positions=torch.cat(positions),
        segments=segments,
        soft_embeds=None if soft is None else soft.reshape(-1, soft.shape[-1]),
    )
    return model(forward, caches).view(batch, num_canvas, -1)
