# ruff: noqa: N803  (Triton convention: compile-time constants are UPPER_CASE kernel arguments)
"""y = x @ W^T for NVFP4 weights, dequantised tile by tile inside the matmul (never stored dequantised).

W (N, K) is stored as in the checkpoints (`engine.quantization.nvfp4`): `packed` uint8 (N, K/2), two
E2M1 codes a byte with the even column in the low nibble; `block_scale` float8_e4m3fn (N, K/16); a
global scale per output row (a scalar broadcast, or (N,) when rows differ, e.g. an expert's gate and
up halves). Each program computes a (BLOCK_M, BLOCK_N) tile of y, looping over K: it loads the codes
and block scales of a (BLOCK_N, BLOCK_K) weight tile, decodes them in registers (E2M1 and E4M3 by bit
arithmetic, so the interpreter and any GPU read them the same way), multiplies by the x tile, and
applies the global scale to the accumulator at the end:

    y[m, n] = g[n] * sum_k x[m, k] * e2m1[n, k] * scale[n, k // 16]      (ModelOpt: g = weight_scale_2)
    y[m, n] = (1 / gs[n]) * ...                                           (compressed-tensors: DIVIDE)

Pure function over tensors; tested against dequantise-then-F.linear under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NVFP4_GROUP = 16


@triton.jit  # type: ignore[untyped-decorator]
def _e2m1(code):  # type: ignore[no-untyped-def]
    """uint8 codes 0..15 -> float32 values: bit 3 sign, exponent bits 2..1, mantissa bit 0."""
    magnitude = code & 7
    exponent = (magnitude >> 1).to(tl.float32)
    mantissa = (magnitude & 1).to(tl.float32)
    value = tl.where(exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * tl.exp2(exponent - 1.0))
    return tl.where((code & 8) != 0, -value, value)


@triton.jit  # type: ignore[untyped-decorator]
def _e4m3(bits):  # type: ignore[no-untyped-def]
    """float8_e4m3fn bit patterns (as uint8) -> float32: bias 7, subnormals below exponent 1."""
    exponent = ((bits >> 3) & 15).to(tl.float32)
    mantissa = (bits & 7).to(tl.float32)
    normal = (1.0 + mantissa / 8.0) * tl.exp2(exponent - 7.0)
    value = tl.where(exponent == 0, mantissa / 8.0 * 0.015625, normal)  # subnormal: m/8 * 2^-6
    return tl.where((bits & 128) != 0, -value, value)


@triton.jit  # type: ignore[untyped-decorator]
def _nvfp4_matmul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, packed_ptr, scale_ptr, global_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_pn, stride_sn, stride_g, stride_om,
    DIVIDE: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns = weight rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0,
        )  # fmt: skip
        w_mask = (cols[:, None] < N) & (ks[None, :] < K)  # (BN, BK)
        byte = tl.load(packed_ptr + cols[:, None] * stride_pn + ks[None, :] // 2, mask=w_mask, other=0)
        code = (byte >> ((ks[None, :] % 2) * 4).to(tl.uint8)) & 15  # low nibble = even column
        bits = tl.load(scale_ptr + cols[:, None] * stride_sn + ks[None, :] // 16, mask=w_mask, other=0)
        w = _e2m1(code) * _e4m3(bits)  # (BN, BK) fp32, exact
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w).to(x.dtype))
    g = tl.load(global_ptr + cols * stride_g, mask=cols < N, other=1.0)  # (BN,)
    acc = acc / g[None, :] if DIVIDE else acc * g[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask
    )


def _block_k(width: int) -> int:
    """The K tile: the largest of 64, 32, 16 dividing the width (NVFP4 widths are multiples of 16)."""
    return next(b for b in (64, 32, 16) if width % b == 0)


def nvfp4_linear(
    x: Tensor, packed: Tensor, block_scale: Tensor, global_scale: Tensor, divide: bool = False
) -> Tensor:
    """x (..., K) @ W^T -> (..., N) in x's dtype, W the NVFP4 weight described in the module docstring.

    `global_scale`: fp32, one element (scalar or (1,)) or (N,); `divide` True for compressed-tensors'
    `weight_global_scale` (a divisor), False for ModelOpt's `weight_scale_2` (a multiplier).
    """
    rows, width = packed.shape[0], packed.shape[1] * 2
    if width % NVFP4_GROUP or block_scale.shape != (rows, width // NVFP4_GROUP):
        raise ValueError(f"NVFP4 weight (N={rows}, K={width}) needs block scales ({rows}, {width // 16})")
    flat = x.reshape(-1, width).contiguous()  # (M, K)
    out = torch.empty(flat.shape[0], rows, dtype=x.dtype, device=x.device)
    g = global_scale.float().reshape(-1)
    scale_bits = block_scale.view(torch.uint8)
    on_gpu = x.device.type == "cuda"
    block_m, block_n = (64 if flat.shape[0] > 16 else 16, 64) if on_gpu else (16, 32)
    grid = (triton.cdiv(flat.shape[0], block_m), triton.cdiv(rows, block_n))
    _nvfp4_matmul_kernel[grid](
        flat, packed, scale_bits, g, out,
        flat.shape[0], rows, width,
        flat.stride(0), packed.stride(0), scale_bits.stride(0), 0 if g.numel() == 1 else 1, out.stride(0),
        DIVIDE=divide, FP32_DOT=_fp32_dot(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(width),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], rows)


def _fp32_dot(x: Tensor) -> bool:
    """fp32 operands for fp32 inputs, and in the interpreter (whose bf16 tl.dot returns garbage in
    triton 3.9, as engine.kernels.paged_attention notes); otherwise tensor-core dots in x's dtype."""
    return x.dtype == torch.float32 or x.device.type != "cuda"
