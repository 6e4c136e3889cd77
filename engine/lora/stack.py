"""`LoRAStack`: one target's adapter weights on the device, stacked in `2 * max_loras` rows.

Row `slot` holds the encoder side of the adapter in that slot, row `max_loras + slot` its decoder side
(`engine.lora.index`). A row an adapter does not fill is zero, so every kernel may read any row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.lora.adapter import LoRAWeights


@dataclass
class LoRAStack:
    """a (rows, [E,] R, in), b (rows, [E,] out, R); `ranks` maps each populated row to its rank."""

    a: Tensor
    b: Tensor
    ranks: dict[int, int] = field(default_factory=dict)

    @classmethod
    def zeros(
        cls,
        num_rows: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        num_experts: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LoRAStack:
        experts = () if num_experts is None else (num_experts,)
        a = torch.zeros(num_rows, *experts, max_rank, in_features, dtype=dtype, device=device)
        b = torch.zeros(num_rows, *experts, out_features, max_rank, dtype=dtype, device=device)
        return cls(a, b)

    def write(self, row: int, weights: LoRAWeights | None) -> None:
        """Fill `row` with `weights` (zero-padded to the stack's rank), or zero it for None."""
        self.a[row].zero_()
        self.b[row].zero_()
        if weights is None:
            self.ranks.pop(row, None)
            return
        rank = weights.rank
        self.a[row, ..., :rank, :].copy_(weights.a)
        self.b[row, ..., :rank].copy_(weights.b)
        self.ranks[row] = rank
