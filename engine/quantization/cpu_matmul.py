"""torch's CPU weight-only matmul kernels for int8 and int4 weights, behind small typed functions.

- int8 per channel: `torch._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,))` = x @ (w * s)^T.
  The scales must have x's dtype. On torch 2.13 bf16 inputs with K % 16 != 0 crash the process
  (segfault, seen for K = 2, 4, 7, 8, 12, 20, 24, 40 with more than one row), so `int8_fits` refuses
  them; fp32 and fp16 took every K probed (7 to 704).
- int4 groups: `torch.ops.aten._convert_weight_to_int4pack_for_cpu(u int32 (N, K) in 0..15, tiles)`
  -> uint8 (N, K/2), then `torch.ops.aten._weight_int4pack_mm_for_cpu(x (M, K), packed, g,
  scales_and_zeros (K/g, N, 2))` computes x @ w^T with `w[n, k] = (u - 8) * scale + zero`, per group.
  Accepted on this CPU (probed on torch 2.13.0): N % 16 == 0, g in {32, 64, 128, 256}, K % g == 0,
  x in fp32 / bf16 / fp16 (scales_and_zeros in x's dtype). Group 16 (and any other) is refused by
  the op; W4A16 checkpoints with such groups use the reference dequantise-then-matmul path.

W4A16's `(q - z) * s` maps onto the int4 kernel's `(u - 8) * s + zero` with u = q + 8 and
`zero = -z * s`, so symmetric (z = 0) and asymmetric checkpoints both run on it. NVFP4's E2M1 grid is
not uniform and cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INT4_CPU_GROUPS = (32, 64, 128, 256)
_INT4_ROW_MULTIPLE = 16
_BF16_INT8_K_MULTIPLE = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def int8_fits(in_features: int, dtype: torch.dtype) -> bool:
    """True when `torch._weight_int8pack_mm` takes this width and activation dtype safely."""
    if dtype not in _KERNEL_DTYPES:
        return False
    return dtype != torch.bfloat16 or in_features % _BF16_INT8_K_MULTIPLE == 0


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """(..., K) @ (int8 (N, K) * scales (N,))^T -> (..., N) in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    out = torch._weight_int8pack_mm(flat, weight, scales.to(x.dtype))  # (M, N)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int4_fits(out_features: int, in_features: int, group_size: int, dtype: torch.dtype) -> bool:
    """True when the CPU int4 kernel takes this shape, group size and activation dtype."""
    return (
        dtype in _KERNEL_DTYPES
        and out_features % _INT4_ROW_MULTIPLE == 0
        and group_size in INT4_CPU_GROUPS
        and in_features % group_size == 0
    )


@dataclass(frozen=True)
class Int4CpuWeight:
    """An int4 weight in the CPU kernel's layout: `packed` uint8 (N, K/2), `scales_and_zeros`
    (K/g, N, 2) in the activation dtype."""

    packed: Tensor
    scales_and_zeros: Tensor
    group_size: int
    out_features: int


def pack_int4_for_cpu(
    values: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int, dtype: torch.dtype
) -> Int4CpuWeight:
    """W4A16 values q (N, K) int8 in [-8, 7], scale (N, G), zero points z (N, G) or None -> kernel layout.

    Caller checks `int4_fits` first; the op raises otherwise.
    """
    unsigned = values.to(torch.int32) + 8  # (N, K) in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2)  # (N, K/2) uint8
    scale_f32 = scale.float()
    zero = torch.zeros_like(scale_f32) if zero_point is None else -zero_point.float() * scale_f32
    scales_and_zeros = torch.stack([scale_f32, zero], dim=-1).transpose(0, 1)  # (G, N, 2)
    return Int4CpuWeight(packed, scales_and_zeros.contiguous().to(dtype), group_size, values.shape[0])


def int4_linear(x: Tensor, weight: Int4CpuWeight) -> Tensor:
    """(..., K) @ w^T for an `Int4CpuWeight` -> (..., N) in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    out: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
        flat, weight.packed, weight.group_size, weight.scales_and_zeros
    )  # (M, N)
    return out.reshape(*x.shape[:-1], weight.out_features)
