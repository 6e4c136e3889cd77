"""The layers' fast paths compute exactly what the reference's formulas do."""

from __future__ import annotations

import pytest
import torch

from engine.model.layers import RMSNorm, rms_norm_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("shape", [(7, 128), (3, 5, 64), (300, 512)])
def test_rms_norm_is_bitwise_the_fp32_formula(
    dtype: torch.dtype, with_scale: bool, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], 1e-6, with_scale)
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(shape[-1], generator=gen) * 2)
    norm = norm.to(dtype)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    assert torch.equal(got, rms_norm_reference(x, norm.weight, 1e-6))
