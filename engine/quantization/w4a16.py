"""W4A16: int4 weights in groups of g along the input dim (compressed-tensors `pack-quantized`).

Stored per linear (out N, in K, G = K / g groups):
- `weight_packed` int32 (N, ceil(K/8)): values q in [-8, 7], see `engine.quantization.int4_pack`;
- `weight_scale` (N, G) in the model's dtype;
- `weight_shape` int64 (2,) = [N, K];
- `weight_zero_point` int32 (ceil(N/8), G), only for asymmetric schemes (`symmetric: false`):
  zero points z in [-8, 7] packed along the output dim.
Dequantised: `w[n, k] = (q[n, k] - z[n, k // g]) * scale[n, k // g]` (z = 0 when symmetric).

Quantiser (round-to-nearest, data-free, what llm-compressor's W4A16 / W4A16_ASYM presets do without
GPTQ), confirmed in compressed-tensors 0.20.1 `quantization/utils/helpers.py` `calculate_qparams`
(int4 range [-8, 7]; symmetric `scale = max(|min|, |max|) / 7.5`; asymmetric `scale = (max - min) / 15`
over min <= 0 <= max, `z = round(clamp(-8 - min / scale, -8, 7))`) and `lifecycle/forward_helpers.py`
(`q = round(clamp(x / scale + z, -8, 7))`, `dequant = (q - z) * scale`). Scales are computed in
float32 and rounded to their storage dtype before quantising; an all-zero group gets the dtype's eps
as its scale (and z = -8 when asymmetric), so it still dequantises to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.quantization.fp8 import nonzero_scale
from engine.quantization.int4_pack import INT4_MAX, INT4_MIN, pack_int4, unpack_int4, unpack_int4_rows

_SYMMETRIC_HALF_RANGE = (INT4_MAX - INT4_MIN) / 2  # 7.5
_RANGE = INT4_MAX - INT4_MIN  # 15


@dataclass(frozen=True)
class W4A16Weight:
    """One packed int4 group-quantised weight, as its checkpoint tensors."""

    weight_packed: Tensor
    weight_scale: Tensor
    weight_shape: Tensor
    weight_zero_point: Tensor | None

    def tensors(self) -> dict[str, Tensor]:
        """The checkpoint's tensors for this linear, by their name suffix."""
        named = {
            "weight_packed": self.weight_packed,
            "weight_scale": self.weight_scale,
            "weight_shape": self.weight_shape,
        }
        if self.weight_zero_point is not None:
            named["weight_zero_point"] = self.weight_zero_point
        return named


def check_group_size(width: int, group_size: int, name: str) -> None:
    """Raise ValueError naming `name` when `group_size` does not divide its input width."""
    if group_size <= 0 or width % group_size:
        working = [g for g in (16, 32, 64, 128, 256) if width % g == 0]
        choices = " or ".join(str(g) for g in working) if working else "none of 16..256"
        raise ValueError(
            f"{name}: group_size {group_size} does not divide its input width {width}; "
            f"group sizes that do: {choices}"
        )


def quantize_w4a16(
    weight: Tensor, group_size: int, symmetric: bool = True, scale_dtype: torch.dtype = torch.bfloat16
) -> W4A16Weight:
    """(N, K) float weight -> packed int4 groups of `group_size` along K, scales in `scale_dtype`."""
    rows, width = weight.shape
    check_group_size(width, group_size, "weight")
    groups = weight.float().reshape(rows, -1, group_size)  # (N, G, g)
    low = groups.amin(dim=-1).clamp(max=0)  # (N, G)
    high = groups.amax(dim=-1).clamp(min=0)
    if symmetric:
        scale = nonzero_scale(torch.maximum(-low, high) / _SYMMETRIC_HALF_RANGE, scale_dtype)
        zero = torch.zeros_like(low)
    else:
        scale = nonzero_scale((high - low) / _RANGE, scale_dtype)
        zero = torch.round((INT4_MIN - low / scale.float()).clamp(INT4_MIN, INT4_MAX))
    scaled = groups / scale.float()[..., None] + zero[..., None]  # (N, G, g)
    quantized = torch.round(scaled.clamp(INT4_MIN, INT4_MAX)).flatten(1)  # (N, K)
    return W4A16Weight(
        weight_packed=pack_int4(quantized),
        weight_scale=scale,
        weight_shape=torch.tensor([rows, width], dtype=torch.int64),
        weight_zero_point=None if symmetric else pack_int4(zero, dim=0),
    )


def unpack_w4a16(
    weight_packed: Tensor, weight_zero_point: Tensor | None, rows: int, width: int, num_groups: int
) -> tuple[Tensor, Tensor | None]:
    """The int8 values (..., N, K) and zero points (..., N, G) (None when symmetric) of a stored weight;
    leading dims (stacked experts) pass through."""
    values = unpack_int4(weight_packed, width)
    zeros = None if weight_zero_point is None else unpack_int4(weight_zero_point, rows, dim=-2)
    if zeros is not None and zeros.shape[-1] != num_groups:
        raise ValueError(f"weight_zero_point has {zeros.shape[-1]} groups; weight_scale has {num_groups}")
    return values, zeros


def dequantize_w4a16(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    width: int,
    dtype: torch.dtype,
) -> Tensor:
    """Stored tensors of one linear (or experts stacked on leading dims) -> (..., N, K) in `dtype`,
    arithmetic in fp32."""
    rows, num_groups = weight_scale.shape[-2:]
    values = unpack_int4_rows(weight_packed, width)  # (..., N, K) float32
    zeros = None if weight_zero_point is None else unpack_int4(weight_zero_point, rows, dim=-2)
    if zeros is not None and zeros.shape[-1] != num_groups:
        raise ValueError(f"weight_zero_point has {zeros.shape[-1]} groups; weight_scale has {num_groups}")
    grouped = values.reshape(*values.shape[:-1], num_groups, -1)  # (..., N, G, g)
    if zeros is not None:
        grouped = grouped - zeros.float()[..., None]
    return (grouped * weight_scale.float()[..., None]).flatten(-2).to(dtype)
