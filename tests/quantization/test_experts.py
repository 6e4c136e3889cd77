"""Stacked experts: fusing gate/up and stacking experts commutes with dequantisation, in every format."""

from __future__ import annotations

import pytest
import torch

from engine.quantization.convert import stored_tensors
from engine.quantization.experts import fuse_gate_up, single_projection, stack_experts
from engine.quantization.nvfp4 import fused_amax
from engine.quantization.reference import dequantize
from engine.quantization.scheme import LinearFormat, WeightFormat

FORMATS = [
    LinearFormat(WeightFormat.FP8_CHANNEL),
    LinearFormat(WeightFormat.W4A16, 16),
    LinearFormat(WeightFormat.W4A16, 16, symmetric=False),
    LinearFormat(WeightFormat.NVFP4_CT, 16),
    LinearFormat(WeightFormat.NVFP4_MODELOPT, 16),
]
EXPERTS, INTER, HIDDEN = 3, 24, 32  # I = 24: zero points of gate and up do not fill whole words


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.weight.value}-{'sym' if f.symmetric else 'asym'}")
@pytest.mark.parametrize("shared_global", [True, False])
def test_stacked_experts_dequantise_like_each_expert(fmt: LinearFormat, shared_global: bool) -> None:
    gen = torch.Generator().manual_seed(9)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.1
    gate_up[:, INTER:] *= 3  # up rows larger than gate rows: different global scales unless shared
    down = torch.randn(EXPERTS, HIDDEN, INTER + 8, generator=gen) * 0.1

    def store(weight: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return stored_tensors(weight, fmt, torch.float32, amax)

    fused, downs, expected_gate_up, expected_down = [], [], [], []
    for e in range(EXPERTS):
        gate, up = gate_up[e].chunk(2)
        amax = fused_amax(gate, up) if shared_global else None
        gate_tensors, up_tensors, down_tensors = store(gate, amax), store(up, amax), store(down[e])
        fused.append(fuse_gate_up(gate_tensors, up_tensors))
        downs.append(single_projection(down_tensors))
        halves = [dequantize(fmt, t, HIDDEN, torch.float32) for t in (gate_tensors, up_tensors)]
        expected_gate_up.append(torch.cat(halves))  # (2I, H)
        expected_down.append(dequantize(fmt, down_tensors, INTER + 8, torch.float32))  # (H, I + 8)
    stacked_gate_up, stacked_down = stack_experts(fused), stack_experts(downs)
    assert torch.equal(dequantize(fmt, stacked_gate_up, HIDDEN, torch.float32), torch.stack(expected_gate_up))
    assert torch.equal(dequantize(fmt, stacked_down, INTER + 8, torch.float32), torch.stack(expected_down))
    if "weight_scale_2" in stacked_gate_up:
        assert stacked_gate_up["weight_scale_2"].shape == (EXPERTS, 2)
    if "weight_zero_point" in stacked_gate_up:
        assert stacked_gate_up["weight_shape"].tolist() == [[2 * INTER, HIDDEN]] * EXPERTS
