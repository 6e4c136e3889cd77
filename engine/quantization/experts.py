"""Per-expert checkpoint tensors -> the engine's stacked expert layout, for any stored format.

The published checkpoints store each expert's projections as 2-D modules
(`<layer>.experts.<e>.{gate,up,down}_proj.<suffix>`); the engine keeps a layer's experts stacked,
gate and up fused: `gate_up_proj` (E, 2I, H) with gate rows first and `down_proj` (E, H, I). Here the
quantised tensors of each suffix are stacked the same way, so a stacked expert tensor dequantises to
exactly the stacked dequantised experts:

- row-wise tensors (`weight`, `weight_packed`, `weight_scale`): gate rows then up rows, then experts;
- packed zero points (rows packed eight to a word): unpacked, concatenated, repacked;
- `weight_shape`: [2I, H];
- per-projection scalars (`weight_scale_2`, `weight_global_scale`, `input_scale`,
  `input_global_scale`): (2,) per expert, [gate, up], so (E, 2) stacked (down: (1,), (E, 1));
  `row_global_scale` expands them to one value per row for the matmul.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from engine.quantization.int4_pack import pack_int4, unpack_int4

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SCALARS = frozenset({"weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale"})


def expert_tensor_name(layer: str, expert: int, projection: str, suffix: str) -> str:
    """`model.decoder.layers.3`, 7, `down_proj`, `weight_scale` -> the checkpoint's tensor name."""
    return f"{layer}.experts.{expert}.{projection}.{suffix}"


def fuse_gate_up(gate: Mapping[str, Tensor], up: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One expert's gate (I, H) and up (I, H) stored tensors -> its gate_up (2I, H) tensors."""
    if set(gate) != set(up):
        raise ValueError(f"gate_proj stores {sorted(gate)} but up_proj stores {sorted(up)}")
    fused: dict[str, Tensor] = {}
    for suffix, first in gate.items():
        second = up[suffix]
        if suffix in SCALARS:
            fused[suffix] = torch.stack([first.reshape(()), second.reshape(())])  # (2,)
        elif suffix == "weight_shape":
            fused[suffix] = torch.stack([first[0] + second[0], first[1]])
        elif suffix == "weight_zero_point":
            rows = int(gate["weight_shape"][0])
            zeros = torch.cat([unpack_int4(first, rows, dim=0), unpack_int4(second, rows, dim=0)])
            fused[suffix] = pack_int4(zeros, dim=0)
        else:
            fused[suffix] = torch.cat([first, second])
    return fused


def single_projection(down: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One expert's down_proj stored tensors with its scalars as (1,), ready for `stack_experts`."""
    return {suffix: t.reshape(1) if suffix in SCALARS else t for suffix, t in down.items()}


def stack_experts(experts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-expert tensors (same suffixes and shapes) -> each suffix stacked on a new leading dim E."""
    return {suffix: torch.stack([expert[suffix] for expert in experts]) for suffix in experts[0]}


def row_global_scale(scale: Tensor, rows: int) -> Tensor:
    """Global scales per projection -> one per weight row, shaped (..., N, 1) to broadcast on (..., N, K).

    `scale`: () for one linear (ModelOpt), (1,) (compressed-tensors), (E, 1) for stacked down
    projections, (E, 2) for stacked gate_up ([gate, up] per expert, each covering rows / 2 rows).
    """
    if scale.ndim == 0:
        return scale.reshape(1, 1)
    parts = scale.shape[-1]
    return scale.repeat_interleave(rows // parts, dim=-1)[..., None]
