"""The NVFP4 and W4A16 dequantise-and-matmul kernels against dequantise-then-F.linear (tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.nvfp4_matmul import nvfp4_linear
from engine.kernels.w4a16_matmul import w4a16_linear
from engine.quantization.nvfp4 import (
    dequantize_nvfp4_ct,
    dequantize_nvfp4_modelopt,
    quantize_nvfp4_ct,
    quantize_nvfp4_modelopt,
)
from engine.quantization.w4a16 import dequantize_w4a16, quantize_w4a16


def data(tokens: int, rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=gen) * 0.05 + 0.01
    weight[0, :16] *= 1e-4  # a tiny block: subnormal FP8 block scales
    return weight, torch.randn(tokens, width, generator=gen)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tol * expected.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "rows", "width"), [(3, 48, 64), (20, 40, 96)])
def test_nvfp4_both_conventions(
    tokens: int, rows: int, width: int, dtype: torch.dtype, device: torch.device
) -> None:
    weight, x = data(tokens, rows, width, rows + width)
    modelopt = quantize_nvfp4_modelopt(weight)
    ct = quantize_nvfp4_ct(weight)
    x = x.to(device, dtype)
    for q, global_scale, divide, dequantize in (
        (modelopt, modelopt.weight_scale_2, False, dequantize_nvfp4_modelopt),
        (ct, ct.global_scale, True, dequantize_nvfp4_ct),
    ):
        reference = F.linear(
            x.float().cpu(), dequantize(q.packed, q.block_scale, global_scale, torch.float32)
        )
        got = nvfp4_linear(x, q.packed.to(device), q.block_scale.to(device), global_scale.to(device), divide)
        assert_close(got.cpu(), reference, dtype)


def test_nvfp4_per_row_global_scale(device: torch.device) -> None:
    """An expert's gate and up halves with different global scales: one (N,) vector."""
    weight, x = data(5, 32, 32, 1)
    gate, up = quantize_nvfp4_modelopt(weight[:16]), quantize_nvfp4_modelopt(weight[16:] * 3)
    packed = torch.cat([gate.packed, up.packed])
    scales = torch.cat([gate.block_scale, up.block_scale])
    per_row = torch.cat([gate.weight_scale_2.expand(16), up.weight_scale_2.expand(16)])
    reference = F.linear(x, dequantize_nvfp4_modelopt(packed, scales, per_row[:, None], torch.float32))
    got = nvfp4_linear(x.to(device), packed.to(device), scales.to(device), per_row.to(device))
    assert_close(got.cpu(), reference, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("tokens", "rows", "width", "group"), [(3, 20, 64, 16), (17, 48, 96, 32), (2, 16, 40, 8)]
)
def test_w4a16(
    tokens: int, rows: int, width: int, group: int, symmetric: bool, dtype: torch.dtype, device: torch.device
) -> None:
    weight, x = data(tokens, rows, width, rows * group)
    q = quantize_w4a16(weight, group, symmetric, scale_dtype=torch.bfloat16)
    reference = F.linear(
        x.to(dtype).float(),
        dequantize_w4a16(q.weight_packed, q.weight_scale, q.weight_zero_point, width, torch.float32),
    )
    zero = None if q.weight_zero_point is None else q.weight_zero_point.to(device)
    got = w4a16_linear(
        x.to(device, dtype), q.weight_packed.to(device), q.weight_scale.to(device), zero, width
    )
    assert_close(got.cpu(), reference, dtype)


def test_shapes_are_checked() -> None:
    q = quantize_w4a16(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match=r"needs weight_packed \(16, 6\)"):
        w4a16_linear(torch.randn(2, 48), q.weight_packed, q.weight_scale, None, 48)
