"""The CPU int8 / int4 kernels against the reference: dequantise, then F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quantization.cpu_matmul import int4_fits, int4_linear, int8_fits, int8_linear, pack_int4_for_cpu
from engine.quantization.int8 import dequantize_int8_channel, quantize_int8_channel
from engine.quantization.w4a16 import dequantize_w4a16, quantize_w4a16, unpack_w4a16


def inputs(rows: int, width: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=gen) * 0.1 + 0.02  # a bias so zero points matter
    x = torch.randn(2, tokens, width, generator=gen)
    return weight, x


def assert_matches(got: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == reference.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    else:  # bf16 kernels round products and sums; compare relative to the output's scale
        assert (got.float() - reference.float()).abs().max() <= 2e-2 * reference.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "width"), [(5, 48), (48, 64)])
def test_int8_kernel_matches_reference(rows: int, width: int, dtype: torch.dtype) -> None:
    weight, x = inputs(rows, width, 3, rows)
    q = quantize_int8_channel(weight)
    reference = F.linear(x.float(), dequantize_int8_channel(q.weight, q.weight_scale, torch.float32))
    assert int8_fits(width, dtype)
    assert_matches(int8_linear(x.to(dtype), q.weight, q.weight_scale), reference.to(dtype), dtype)


def test_int8_refuses_bf16_widths_that_crash() -> None:
    assert not int8_fits(24, torch.bfloat16)
    assert int8_fits(24, torch.float32) and int8_fits(704, torch.bfloat16)
    assert not int8_fits(64, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("rows", "width", "group"), [(16, 64, 32), (32, 128, 64), (16, 256, 128), (16, 512, 256)]
)
def test_int4_kernel_matches_reference(
    rows: int, width: int, group: int, symmetric: bool, dtype: torch.dtype
) -> None:
    weight, x = inputs(rows, width, 5, width + group)
    q = quantize_w4a16(weight, group, symmetric, scale_dtype=torch.float32)
    reference = F.linear(
        x, dequantize_w4a16(q.weight_packed, q.weight_scale, q.weight_zero_point, width, torch.float32)
    )
    values, zeros = unpack_w4a16(q.weight_packed, q.weight_zero_point, rows, width, width // group)
    assert int4_fits(rows, width, group, dtype)
    packed = pack_int4_for_cpu(values, q.weight_scale, zeros, group, dtype)
    assert_matches(int4_linear(x.to(dtype), packed), reference.to(dtype), dtype)


def test_int4_expert_width_704_takes_groups_32_and_64() -> None:
    assert [g for g in (16, 32, 64, 128, 256) if int4_fits(2816, 704, g, torch.bfloat16)] == [32, 64]
    assert not int4_fits(24, 64, 32, torch.float32)  # rows must be a multiple of 16
