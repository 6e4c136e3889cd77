"""Signed int4 values packed eight to an int32, as compressed-tensors `pack-quantized` stores them.

Each value v in [-8, 7] is stored as v + 8 (0..15); element i of a packed run sits at bits 4i..4i+3,
least significant first; a run shorter than a multiple of 8 is zero-padded (so the padding reads as
-8 and is cut off on unpacking by the known length). Example: the row [-8, -7, 0, 7, 0, 0, 0, 0]
packs to 0x88880F10 (as int32, -2004349168).

`weight_packed` packs along the row (the input dim): (N, K) -> (N, ceil(K/8)). Asymmetric
`weight_zero_point` (N, K/g) packs along **dim 0** (the output dim): (ceil(N/8), K/g).

Confirmed against compressed-tensors 0.20.1 `compressors/pack_quantized/helpers.py`
(`pack_to_int32`: `offset = 1 << (num_bits - 1)`, element i at bit `i * num_bits`;
`unpack_from_int32`) and `compressors/pack_quantized/base.py` (`pack_to_int32(zero_point,
num_bits, packed_dim=0)`, unpacked with `shape (*weight_shape[:-1], scale.shape[-1])`).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_MIN = -8
INT4_MAX = 7
_OFFSET = 8
_PER_WORD = 8


def packed_width(length: int) -> int:
    """int32 words holding `length` int4 values."""
    return -(-length // _PER_WORD)


def pack_int4(values: Tensor, dim: int = -1) -> Tensor:
    """int values in [-8, 7] (any integer dtype) -> int32, eight per word along `dim`."""
    moved = values.movedim(dim, -1)
    length = moved.shape[-1]
    unsigned = (moved.to(torch.int64) + _OFFSET).clamp(0, 15)
    pad = packed_width(length) * _PER_WORD - length
    unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    nibbles = unsigned.reshape(*unsigned.shape[:-1], -1, _PER_WORD)  # (..., W, 8)
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(dim=-1)  # (..., W) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int4_rows(packed: Tensor, length: int) -> Tensor:
    """int32 words packed along the last dim -> float32 values in [-8, 7], `length` of them.

    The fast path for dequantising weights: the words are read as little-endian bytes (byte b of a
    word holds elements 2b and 2b + 1, low nibble first) and each byte becomes two values through a
    256-entry table. Equal to `unpack_int4(packed, length).float()`.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 weights must be int32; got {packed.dtype}")
    if packed.shape[-1] != packed_width(length):
        raise ValueError(
            f"{packed.shape[-1]} int32 words cannot hold {length} int4 values "
            f"(expected {packed_width(length)})"
        )
    byte = torch.arange(256, device=packed.device)
    table = torch.stack(((byte & 0x0F) - _OFFSET, (byte >> 4) - _OFFSET), dim=-1).float()  # (256, 2)
    as_bytes = packed.contiguous().view(torch.uint8)  # (..., W * 4), little-endian
    values = table[as_bytes.long()].flatten(-2)  # (..., W * 8)
    return values[..., :length]


def unpack_int4(packed: Tensor, length: int, dim: int = -1) -> Tensor:
    """int32 words -> int8 values in [-8, 7], `length` of them along `dim`; inverse of `pack_int4`."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 weights must be int32; got {packed.dtype}")
    moved = packed.movedim(dim, -1)
    if moved.shape[-1] != packed_width(length):
        raise ValueError(
            f"{moved.shape[-1]} int32 words cannot hold {length} int4 values "
            f"(expected {packed_width(length)})"
        )
    words = moved.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # (..., W, 8)
    values = nibbles.flatten(-2)[..., :length] - _OFFSET
    return values.to(torch.int8).movedim(-1, dim).contiguous()
