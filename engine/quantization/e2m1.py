"""FP4 E2M1 values: encode, decode and two-to-a-byte packing, as NVFP4 checkpoints store them.

A 4-bit code is bit 3 = sign, bits 0-2 = magnitude index into [0, 0.5, 1, 1.5, 2, 3, 4, 6]; a byte
holds two codes along a row, the **low nibble the even column**: byte 0x2A holds column 0 = 0xA
(-1.0) and column 1 = 0x2 (+1.0).

Confirmed against compressed-tensors 0.20.1 (`compressors/nvfp4/helpers.py`: `pack_fp4_to_uint8`
puts `indices[:, 0] | indices[:, 1] << 4`, `unpack_fp4_from_uint8` stacks (low, high); the same
`kE2M1ToFloat` table) and vLLM's `modelopt.py` (`ModelOptNvFp4EmbeddingMethod`: "low nibble first",
the same 16-entry lookup table), so both NVFP4 conventions share this layout.

Rounding (`encode_e2m1`) is round-to-nearest with ties to the even mantissa, the thresholds of
compressed-tensors' `cast_to_fp4` / `_round_to_fp4`: |x| <= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1,
< 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3, <= 5 -> 4, above -> 6. The sign bit is x's sign bit, so a
small negative value encodes as -0 (code 8), as compressed-tensors' packer does.
"""

from __future__ import annotations

import torch
from torch import Tensor

E2M1_MAX = 6.0
"""The largest E2M1 magnitude."""

_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# (threshold, tie goes up): the magnitude index is the number of thresholds |x| passes.
_THRESHOLDS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)


def e2m1_table(device: torch.device | str = "cpu") -> Tensor:
    """The 16 code values as float32, code 8 being -0.0."""
    magnitudes = torch.tensor(_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])  # (16,)


def encode_e2m1(x: Tensor) -> Tensor:
    """Round each value to the nearest E2M1 value (ties to even, saturating at +-6); uint8 codes 0..15."""
    magnitude = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, tie_up in _THRESHOLDS:
        passed = magnitude >= threshold if tie_up else magnitude > threshold
        index += passed.to(torch.uint8)
    sign = torch.signbit(x).to(torch.uint8) << 3
    return index | sign


def decode_e2m1(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 -> their float32 values."""
    return e2m1_table(codes.device)[codes.long()]


def byte_table(device: torch.device | str = "cpu") -> Tensor:
    """(256, 2) float32: the values of a packed byte's two codes, [low nibble, high nibble]."""
    table = e2m1_table(device)
    byte = torch.arange(256, device=device)
    return torch.stack((table[byte & 0x0F], table[byte >> 4]), dim=-1)


def decode_packed(packed: Tensor) -> Tensor:
    """(..., K/2) uint8 packed codes -> (..., K) float32 values: one table lookup per byte (the same
    values as `decode_e2m1(unpack_nibbles(packed))`, without the intermediate code tensor)."""
    return byte_table(packed.device)[packed.long()].flatten(-2)


def pack_nibbles(codes: Tensor) -> Tensor:
    """(..., K) uint8 codes, K even -> (..., K/2) uint8, column 2j in the low nibble of byte j."""
    if codes.shape[-1] % 2:
        raise ValueError(f"E2M1 packing needs an even row width; got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 codes; the inverse of `pack_nibbles`."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., K/2, 2) -> (..., K)
