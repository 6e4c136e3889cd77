"""NVFP4: E2M1 weights in blocks of 16 along the input dim, an FP8 scale per block, a global scale.

Both published conventions store the same codes and block scales for a linear (out N, in K):
`(N, K/2)` uint8 (two E2M1 codes a byte, `engine.quantization.e2m1`) and `(N, K/16)`
float8_e4m3fn block scales. They differ in the global scale's name and direction:

- ModelOpt (`"quant_method": "modelopt"`, `"quant_algo": "NVFP4"`): `weight`, `weight_scale`,
  `weight_scale_2` float32 scalar = amax / (6 * 448), `input_scale` float32 scalar;
  `w = e2m1 * weight_scale * weight_scale_2`.
- compressed-tensors (`nvfp4-pack-quantized`): `weight_packed`, `weight_scale`,
  `weight_global_scale` float32 (1,) = (6 * 448) / amax, optionally `input_global_scale` (1,);
  `w = e2m1 * (weight_scale / weight_global_scale)`.

Confirmed: compressed-tensors 0.20.1 `entrypoints/convert/converters/modelopt_nvfp4.py` converts
ModelOpt to compressed-tensors by renaming `weight` -> `weight_packed` and taking `1 / weight_scale_2`
-> `weight_global_scale`, `1 / input_scale` -> `input_global_scale`; `compressors/nvfp4/base.py`
decompresses with `dequantize(x_q, scale, global_scale)` = `x_q * (scale / global_scale)`
(`lifecycle/forward_helpers.py` `_dequantize`); `quantization/utils/helpers.py` `generate_gparam`
gives the global scale `448 * 6 / amax` as float32 (1,). vLLM's `modelopt.py` (NVFP4 linear
`create_weights`: `weight` uint8 (N, K/2), `weight_scale` float8_e4m3fn (N, K/group), scalars
`weight_scale_2`, `input_scale`; "ModelOpt stores amax / (NVFP4_max * fp8_e4m3_max) = amax / 2688").

Quantisers (round-to-nearest, data-free, NVFP4A16):
- compressed-tensors arithmetic: `gs = 2688 / amax`; block scale `fp8(gs * block_amax / 6)` (a zero
  becomes 0.125, compressed-tensors' FP8 eps); codes `e2m1(clamp(w / (scale / gs), -6, 6))`.
- ModelOpt arithmetic: `ws2 = amax / 2688`; block scale `fp8(block_amax / (6 * ws2))`; codes
  `e2m1(w / (scale * ws2))`. (ModelOpt itself was not run here: it needs CUDA; the formula is the one
  vLLM documents for its checkpoints.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.quantization.e2m1 import E2M1_MAX, decode_packed, encode_e2m1, pack_nibbles
from engine.quantization.fp8 import FP8_DTYPE, FP8_MAX, nonzero_scale

NVFP4_GROUP = 16
"""Elements per block scale."""

_GLOBAL_RANGE = E2M1_MAX * FP8_MAX  # 2688


@dataclass(frozen=True)
class Nvfp4Weight:
    """One NVFP4 weight: packed codes (N, K/2) uint8, block scales (N, K/16) FP8, and the global scale
    in ModelOpt's direction (`weight_scale_2`, a float32 scalar multiplier)."""

    packed: Tensor
    block_scale: Tensor
    weight_scale_2: Tensor

    def modelopt_tensors(self, input_scale: float = 1.0) -> dict[str, Tensor]:
        """The ModelOpt checkpoint tensors. `input_scale` is the activation scale (unused by W4A16 math)."""
        return {
            "weight": self.packed,
            "weight_scale": self.block_scale,
            "weight_scale_2": self.weight_scale_2.reshape(()),
            "input_scale": torch.tensor(input_scale, dtype=torch.float32),
        }


@dataclass(frozen=True)
class Nvfp4CtWeight:
    """One NVFP4 weight in compressed-tensors' convention (`weight_global_scale` = divisor, (1,))."""

    packed: Tensor
    block_scale: Tensor
    global_scale: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The checkpoint's tensors for this linear (NVFP4A16: no `input_global_scale`)."""
        return {
            "weight_packed": self.packed,
            "weight_scale": self.block_scale,
            "weight_global_scale": self.global_scale.reshape(1),
        }


def _blocks(weight: Tensor) -> Tensor:
    rows, width = weight.shape
    if width % NVFP4_GROUP:
        raise ValueError(f"NVFP4 needs input widths that are multiples of {NVFP4_GROUP}; got {width}")
    return weight.float().reshape(rows, -1, NVFP4_GROUP)  # (N, K/16, 16)


def _amax(weight: Tensor) -> Tensor:
    return weight.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)


def _fp8_block_scale(value: Tensor) -> Tensor:
    return value.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _pack_codes(blocks: Tensor, divisor: Tensor) -> Tensor:
    scaled = (blocks / divisor[..., None]).clamp(-E2M1_MAX, E2M1_MAX)  # (N, K/16, 16)
    return pack_nibbles(encode_e2m1(scaled.flatten(1)))


def fused_amax(*weights: Tensor) -> Tensor:
    """The largest |value| over weights that share one global scale (q/k/v; an expert's gate/up).

    llm-compressor gives fused projections one global scale, the smallest of theirs (seen in its
    NVFP4A16 output: gate_proj and up_proj, q_proj and k_proj carry equal `weight_global_scale`).
    """
    return torch.stack([_amax(w) for w in weights]).amax()


def quantize_nvfp4_ct(weight: Tensor, amax: Tensor | None = None) -> Nvfp4CtWeight:
    """(N, K) float weight -> NVFP4 with compressed-tensors' arithmetic and storage.

    `amax` (default: this weight's) sets the global scale; pass `fused_amax(...)` to share it.
    """
    blocks = _blocks(weight)
    amax = _amax(weight) if amax is None else amax
    global_scale = torch.nan_to_num(_GLOBAL_RANGE / amax, nan=1.0, posinf=1.0, neginf=1.0)
    block_amax = blocks.abs().amax(dim=-1)  # (N, K/16)
    scale = nonzero_scale(global_scale * (block_amax / E2M1_MAX), FP8_DTYPE)
    packed = _pack_codes(blocks, scale.float() / global_scale)
    return Nvfp4CtWeight(packed, scale, global_scale.reshape(1))


def quantize_nvfp4_modelopt(weight: Tensor, amax: Tensor | None = None) -> Nvfp4Weight:
    """(N, K) float weight -> NVFP4 with ModelOpt's arithmetic and storage (`amax` as for `_ct`)."""
    blocks = _blocks(weight)
    weight_scale_2 = (_amax(weight) if amax is None else amax) / _GLOBAL_RANGE
    weight_scale_2 = torch.where(weight_scale_2 > 0, weight_scale_2, torch.ones_like(weight_scale_2))
    block_amax = blocks.abs().amax(dim=-1)  # (N, K/16)
    scale = _fp8_block_scale(block_amax / (E2M1_MAX * weight_scale_2))
    divisor = scale.float() * weight_scale_2
    packed = _pack_codes(blocks, torch.where(divisor == 0, torch.ones_like(divisor), divisor))
    return Nvfp4Weight(packed, scale, weight_scale_2)


def _dequantize(packed: Tensor, block_scale_f32: Tensor, dtype: torch.dtype) -> Tensor:
    """e2m1 codes times their fp32 block scales (exact in fp32 for FP8 scales), cast to `dtype`."""
    values = decode_packed(packed)  # (..., N, K)
    grouped = values.reshape(*values.shape[:-1], -1, NVFP4_GROUP)  # (..., N, K/16, 16)
    return (grouped * block_scale_f32[..., None]).flatten(-2).to(dtype)


def dequantize_nvfp4_modelopt(
    packed: Tensor, weight_scale: Tensor, weight_scale_2: Tensor, dtype: torch.dtype
) -> Tensor:
    """ModelOpt tensors -> (..., N, K) in `dtype`: `(e2m1 * weight_scale) * weight_scale_2` in fp32.

    The product e2m1 * fp8 is exact in fp32, so the only rounding is the global multiply.
    `weight_scale_2` broadcasts against (..., N, K): a scalar for one linear, (E, 1, 1) for stacked
    experts, (E, N, 1) when an expert's gate and up rows carry different global scales
    (`engine.quantization.experts.row_global_scale`).
    """
    exact = _dequantize(packed, weight_scale.float(), torch.float32)  # (..., N, K), no rounding yet
    return (exact * weight_scale_2.float()).to(dtype)


def dequantize_nvfp4_ct(
    packed: Tensor, weight_scale: Tensor, weight_global_scale: Tensor, dtype: torch.dtype
) -> Tensor:
    """compressed-tensors tensors -> (..., N, K) in `dtype`: `e2m1 * (weight_scale / weight_global_scale)`.

    `weight_global_scale` broadcasts against the (..., N, K/16) block scales: (1,) for one linear,
    (E, 1, 1) for stacked experts, (E, N, 1) for per-row global scales.
    """
    return _dequantize(packed, weight_scale.float() / weight_global_scale.float(), dtype)
