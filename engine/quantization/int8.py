"""int8 weights with one scale per output channel, for `--quantization int8` (quantised at load).

Not a published checkpoint format: the CPU's answer for memory, because torch has a fused CPU kernel
for it (`torch._weight_int8pack_mm`, `engine.quantization.cpu_matmul`). Symmetric, round-to-nearest:
`scale = max|w_row| / 127`, `q = round(w / scale)` in [-127, 127], `w = q * scale`. Scales are kept
in float32 (N values per linear: negligible memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INT8_MAX = 127.0


@dataclass(frozen=True)
class Int8Channel:
    """One int8 per-channel weight: `weight` (N, K) int8, `weight_scale` (N,) float32."""

    weight: Tensor
    weight_scale: Tensor


def quantize_int8_channel(weight: Tensor) -> Int8Channel:
    """(N, K) float weight -> int8 values and one float32 scale per row."""
    max_abs = weight.abs().amax(dim=1).float()  # (N,)
    scale = torch.where(max_abs == 0, torch.ones_like(max_abs), max_abs / INT8_MAX)
    quantized = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return Int8Channel(quantized.to(torch.int8), scale)


def dequantize_int8_channel(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, K) int8 and (N,) scales -> (N, K) in `dtype` (product in fp32)."""
    return (weight.float() * weight_scale.float()[..., None]).to(dtype)
