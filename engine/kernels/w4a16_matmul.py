# ruff: noqa: N803  (Triton convention: compile-time constants are UPPER_CASE kernel arguments)
"""y = x @ W^T for W4A16 weights (int4 groups), dequantised tile by tile inside the matmul.

W (N, K) is stored as compressed-tensors `pack-quantized` stores it (`engine.quantization.w4a16`):
`weight_packed` int32 (N, ceil(K/8)), element k of a row at bits 4 * (k % 8) of word k // 8, as
value + 8; `weight_scale` (N, K/g) in bf16 / fp16 / fp32; optional `weight_zero_point` int32
(ceil(N/8), K/g), zero points packed the same way but along the output dim. Each program computes a
(BLOCK_M, BLOCK_N) tile of y, looping over K; each (BLOCK_N, BLOCK_K) weight tile is decoded in
registers as `(q - z) * scale[n, k // g]` and multiplied with the x tile:

    y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k // g]) * scale[n, k // g]

Pure function over tensors; tested against dequantise-then-F.linear under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit  # type: ignore[untyped-decorator]
def _nibble(words, index):  # type: ignore[no-untyped-def]
    """The int4 value (as int32, -8..7) at position `index` of its 8-value int32 word."""
    return ((words >> ((index % 8) * 4)) & 15) - 8


@triton.jit  # type: ignore[untyped-decorator]
def _w4a16_matmul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr,
    M, N, K, GROUP,
    stride_xm, stride_pn, stride_sn, stride_zn, stride_om,
    HAS_ZERO: tl.constexpr, FP32_DOT: tl.constexpr,
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
        words = tl.load(packed_ptr + cols[:, None] * stride_pn + ks[None, :] // 8, mask=w_mask, other=0)
        q = _nibble(words, ks[None, :]).to(tl.float32)
        group = ks[None, :] // GROUP
        scale = tl.load(scale_ptr + cols[:, None] * stride_sn + group, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero_words = tl.load(zero_ptr + (cols[:, None] // 8) * stride_zn + group, mask=w_mask, other=0)
            q = q - _nibble(zero_words, cols[:, None]).to(tl.float32)
        w = q * scale  # (BN, BK) fp32
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w).to(x.dtype))
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask
    )


def _block_k(width: int) -> int:
    """The K tile: 64, or 32 / 16 for narrower weights (tl.dot needs at least 16)."""
    return 64 if width >= 64 else 32 if width >= 32 else 16


def w4a16_linear(
    x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, width: int
) -> Tensor:
    """x (..., K) @ W^T -> (..., N) in x's dtype, W the W4A16 weight described in the module docstring.

    `width` is K (the checkpoint's `weight_shape[1]`); the group size is K / weight_scale.shape[1].
    """
    rows, num_groups = weight_scale.shape
    if width % num_groups or weight_packed.shape != (rows, -(-width // 8)):
        raise ValueError(
            f"W4A16 weight (N={rows}, K={width}) needs weight_packed ({rows}, {-(-width // 8)}) and "
            f"a group count dividing K; got {tuple(weight_packed.shape)} and {num_groups} groups"
        )
    flat = x.reshape(-1, width).contiguous()  # (M, K)
    out = torch.empty(flat.shape[0], rows, dtype=x.dtype, device=x.device)
    zero = weight_zero_point if weight_zero_point is not None else weight_packed
    on_gpu = x.device.type == "cuda"
    block_m, block_n = (64 if flat.shape[0] > 16 else 16, 64) if on_gpu else (16, 32)
    grid = (triton.cdiv(flat.shape[0], block_m), triton.cdiv(rows, block_n))
    _w4a16_matmul_kernel[grid](
        flat, weight_packed, weight_scale, zero, out,
        flat.shape[0], rows, width, width // num_groups,
        flat.stride(0), weight_packed.stride(0), weight_scale.stride(0), zero.stride(0), out.stride(0),
        HAS_ZERO=weight_zero_point is not None, FP32_DOT=_fp32_dot(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(width),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], rows)


def _fp32_dot(x: Tensor) -> bool:
    """fp32 operands for fp32 inputs, and in the interpreter (whose bf16 tl.dot returns garbage in
    triton 3.9, as engine.kernels.paged_attention notes); otherwise tensor-core dots in x's dtype."""
    return x.dtype == torch.float32 or x.device.type != "cuda"
