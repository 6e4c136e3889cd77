"""bench/quantized.py: the 26B-A4B text weights per format meet the issue's memory targets (computed on
the meta device), and a model built in place keeps exactly its stored bytes."""

from __future__ import annotations

import pytest
import torch

from bench.quantized import build, meta_model, model_config, weight_bytes
from tests.engine.checkpoints import tiny_model_config


def test_the_26b_text_model_fits_the_targets() -> None:
    config = model_config(30)
    sizes = {fmt: weight_bytes(meta_model(config, fmt)[0]) / 1e9 for fmt in ("bf16", "fp8", "w4a16", "nvfp4")}
    assert 50 < sizes["bf16"] < 51
    assert sizes["fp8"] <= 28 and sizes["nvfp4"] <= 18 and sizes["w4a16"] <= 18


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nvfp4"])
def test_a_model_built_in_place_keeps_its_stored_bytes_and_runs(fmt: str) -> None:
    config = tiny_model_config(moe_intermediate_size=32)
    model = build(config, fmt)
    assert weight_bytes(model) == weight_bytes(meta_model(config, fmt)[0])
    x = torch.randn(5, config.hidden_size, dtype=torch.bfloat16)
    weights = torch.full((5, config.top_k_experts), 0.5)
    ids = torch.arange(5 * config.top_k_experts).reshape(5, -1) % config.num_experts
    assert torch.isfinite(model.layers[0].experts(x, weights, ids)).all()
