"""The fast weight kernels against the reference dequantise-then-matmul, on CPU.

`torch._scaled_mm` runs FP8 on this CPU too (torch 2.13), so the CUDA FP8 path's arithmetic is
checked here against an emulation of it (activations quantised to FP8 per token, both operands
dequantised, an fp32 matmul); the Hopper run itself needs a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quantization.fp8 import FP8_MAX, quantize_fp8_channel
from engine.quantization.int8 import quantize_int8_channel
from engine.quantization.register import choose_kernel
from engine.quantization.scheme import LinearFormat, WeightFormat
from engine.quantization.w4a16 import quantize_w4a16
from engine.quantization.weight_kernels import (
    Fp8ScaledMmKernel,
    Int4CpuKernel,
    Int8CpuKernel,
    ReferenceKernel,
    fp8_scaled_mm,
    quantize_per_token,
)

FP8 = LinearFormat(WeightFormat.FP8_CHANNEL)
INT8 = LinearFormat(WeightFormat.INT8_CHANNEL)


def weight(n: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def activations(m: int = 5, k: int = 256, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return x * torch.logspace(-2, 1, m)[:, None]  # tokens of very different magnitudes


def test_per_token_quantisation_scales_each_row_to_the_fp8_range() -> None:
    x = activations()
    quantized, scale = quantize_per_token(x)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    torch.testing.assert_close(quantized.float().abs().amax(dim=-1), torch.full((5,), FP8_MAX))
    torch.testing.assert_close(quantized.float() * scale, x, atol=0, rtol=0.07)


def test_fp8_scaled_mm_equals_its_emulation() -> None:
    stored = quantize_fp8_channel(weight(), torch.bfloat16)
    x = activations()
    quantized, x_scale = quantize_per_token(x)
    emulated = F.linear(quantized.float() * x_scale, stored.weight.float() * stored.weight_scale.float())
    got = fp8_scaled_mm(x, stored.weight, stored.weight_scale)
    torch.testing.assert_close(got, emulated, atol=1e-5, rtol=1e-5)
    reference = ReferenceKernel(FP8).matmul(x, stored.tensors())
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()  # activation rounding only
    kernel = Fp8ScaledMmKernel(FP8)
    assert torch.equal(
        kernel.matmul(x.bfloat16(), stored.tensors()), fp8_scaled_mm(x.bfloat16(), *stored.tensors().values())
    )
    assert torch.equal(kernel.matmul(x, stored.tensors()), reference)  # fp32 output: the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_the_reference(dtype: torch.dtype) -> None:
    stored = quantize_int8_channel(weight())
    tensors = {"weight": stored.weight, "weight_scale": stored.weight_scale}
    x = activations().to(dtype)
    got = Int8CpuKernel(INT8).matmul(x, tensors)
    want = ReferenceKernel(INT8).matmul(x, tensors)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_equals_the_reference_and_keeps_experts_stacked(symmetric: bool) -> None:
    fmt = LinearFormat(WeightFormat.W4A16, 64, symmetric)
    experts = [quantize_w4a16(weight(seed=e), 64, symmetric, torch.float32).tensors() for e in range(3)]
    stacked = {name: torch.stack([e[name] for e in experts]) for name in experts[0]}
    kernel = Int4CpuKernel(fmt, torch.float32, max_overhead=1.0)
    prepared = kernel.prepare(stacked)
    assert set(prepared) == {"int4_packed", "int4_scales_and_zeros"}
    x = activations()
    for e in range(3):
        got = kernel.matmul(x, {n: t[e] for n, t in prepared.items()})
        want = ReferenceKernel(fmt).matmul(x, experts[e])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_int4_kernel_keeps_the_stored_layout_when_repacking_costs_more_than_five_percent() -> None:
    fmt = LinearFormat(WeightFormat.W4A16, 64)
    stored = quantize_w4a16(weight(), 64, True, torch.bfloat16).tensors()
    assert Int4CpuKernel(fmt, torch.float32).prepare(stored) is stored
    fmt128 = LinearFormat(WeightFormat.W4A16, 128)
    assert Int4CpuKernel(fmt128, torch.bfloat16).repack_overhead(torch.bfloat16) <= 0.05


def test_kernels_are_chosen_by_format_and_device() -> None:
    cpu = torch.device("cpu")
    assert type(choose_kernel(INT8, cpu, torch.float32)) is Int8CpuKernel
    assert type(choose_kernel(FP8, cpu, torch.float32)) is ReferenceKernel
    assert type(choose_kernel(LinearFormat(WeightFormat.W4A16, 32), cpu, torch.bfloat16)) is Int4CpuKernel
    nvfp4 = LinearFormat(WeightFormat.NVFP4_MODELOPT, 16)
    assert type(choose_kernel(nvfp4, cpu, torch.float32)) is ReferenceKernel
