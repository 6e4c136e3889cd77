"""`bench/matmul_bound.py`'s memory floor counts every weight a denoise forward reads, once."""

from __future__ import annotations

import torch

from bench.matmul_bound import bench_config, memory_floor
from engine.model.diffusion_gemma import DiffusionGemma


def test_the_floor_reads_each_forward_weight_once_and_the_logits_three_times() -> None:
    config = bench_config()
    with torch.device("meta"):
        model = DiffusionGemma(config)
    # The first denoise step has no self-conditioning input; vectors (norm scales) are negligible.
    weights = sum(
        p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "self_conditioning" not in n
    )
    assert memory_floor(config, 0, torch.bfloat16) == 2 * weights
    logits = 4 * config.canvas_length * config.vocab_size
    assert memory_floor(config, 4, torch.bfloat16) - memory_floor(config, 0, torch.bfloat16) == logits * 8
