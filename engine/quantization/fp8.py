"""FP8 E4M3 weights with one scale per output channel (compressed-tensors `float-quantized`, FP8_DYNAMIC).

Stored per linear (out N, in K): `weight` float8_e4m3fn (N, K) and `weight_scale` (N, 1) in the
model's dtype (BF16 in the published checkpoint). Dequantised: `w = weight.f32 * weight_scale`.
Activations are quantised per token at run time (no stored input scale).

Quantiser (round-to-nearest, data-free), as compressed-tensors computes it for a symmetric channel
scheme (`quantization/utils/helpers.py` `calculate_qparams`: `max(|min|, |max|) / (range / 2)`, the
E4M3 range being +-448; a zero scale becomes the scale dtype's eps; `lifecycle/forward_helpers.py`
`_quantize`: `clamp(x / scale, -448, 448).to(float8_e4m3fn)`), confirmed in compressed-tensors
0.20.1. The scale is rounded to its storage dtype before the weights are divided by it, so
`dequantize(quantize(w))` is exactly what the checkpoint means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


@dataclass(frozen=True)
class Fp8Channel:
    """One FP8 per-channel weight: `weight` (N, K) float8_e4m3fn, `weight_scale` (N, 1)."""

    weight: Tensor
    weight_scale: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The checkpoint's tensors for this linear, by their name suffix."""
        return {"weight": self.weight, "weight_scale": self.weight_scale}


def nonzero_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`scale` rounded to `dtype`, zeros (an all-zero row or group) replaced by the dtype's eps."""
    rounded = scale.to(dtype)
    eps = 0.125 if dtype == FP8_DTYPE else torch.finfo(dtype).eps  # compressed-tensors' _get_dtype_eps
    return torch.where(rounded == 0, torch.tensor(eps, dtype=dtype, device=scale.device), rounded)


def quantize_fp8_channel(weight: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Fp8Channel:
    """(N, K) float weight -> FP8 E4M3 values and one `scale_dtype` scale per row."""
    max_abs = weight.abs().amax(dim=1, keepdim=True).float()  # (N, 1)
    scale = nonzero_scale(max_abs / FP8_MAX, scale_dtype)
    quantized = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Channel(quantized, scale)


def dequantize_fp8_channel(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., N, K) FP8 values and (..., N, 1) scales -> (..., N, K) in `dtype` (product in fp32)."""
    return (weight.float() * weight_scale.float()).to(dtype)
