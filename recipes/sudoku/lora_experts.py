"""LoRA deltas on the MoE experts' 3-D weights, in PEFT's `target_parameters` layout, one per side.

PEFT adapts a 3-D parameter (E, out, in) (transformers' `experts.gate_up_proj` (E, 2I, H) and
`experts.down_proj` (E, H, I)) with one pair per parameter: A (E * r, in), expert e's rows at
[e * r, (e + 1) * r), and B (out, E * r), expert e's rank column j at j * E + e; expert e's weight
becomes W_e + scaling * B_e A_e. With both weights targeted PEFT nests its wrappers: in the adapter
file gate_up_proj's pair sits under `experts.base_layer` and down_proj's under `experts` (the order of
`target_parameters`: gate_up first). `engine.lora.adapter` reads the same layout.

`LoRAExperts` wraps a layer's `Experts` module: on a pass of a side it has deltas for, the looped
experts run on the merged weights (small for the Sudoku model: 4 experts of 256 x 128 and 128 x 128),
so the deltas train through the merge; otherwise the wrapped module runs unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.model.layers import Experts
from engine.model.methods.base import stored
from engine.model.methods.plain import looped_experts
from recipes.sudoku.lora_linear import Role, Side, peft_init


class LoRAExpertWeight(nn.Module):
    """One expert weight's deltas, per side, in PEFT's layout: A (E * r, in), B (out, E * r)."""

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, rank: int, roles: tuple[Role, ...]
    ) -> None:
        super().__init__()
        self.num_experts, self.rank = num_experts, rank
        self.lora_A = nn.ParameterDict(
            {role: nn.Parameter(torch.empty(num_experts * rank, in_features)) for role in roles}
        )
        self.lora_B = nn.ParameterDict(
            {role: nn.Parameter(torch.zeros(out_features, num_experts * rank)) for role in roles}
        )

    def reset(self, generator: torch.Generator) -> None:
        peft_init(self.lora_A, self.lora_B, generator)

    def delta(self, role: Role) -> Tensor:
        """(E, out, in): expert e's B_e A_e (unscaled)."""
        a, b = self.lora_A[role], self.lora_B[role]
        per_expert_a = a.view(self.num_experts, self.rank, a.shape[1])  # (E, r, in)
        per_expert_b = b.view(b.shape[0], self.rank, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        return torch.bmm(per_expert_b, per_expert_a)


class LoRAExperts(nn.Module):
    """`Experts` (plain weights, frozen) plus deltas on gate_up_proj and down_proj for each of `roles`."""

    def __init__(self, base: Experts, rank: int, scaling: float, roles: tuple[Role, ...], side: Side) -> None:
        super().__init__()
        gate_up, down = stored(base, "gate_up_proj"), stored(base, "down_proj")  # (E, 2I, H), (E, H, I)
        num, inter2, hidden = gate_up.shape
        self.base = base
        self.scaling = scaling
        self.side = side
        self.gate_up = LoRAExpertWeight(num, hidden, inter2, rank, roles)
        self.down = LoRAExpertWeight(num, down.shape[2], hidden, rank, roles)

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        role = self.side.role
        if role is None:
            raise RuntimeError("LoRAExperts called outside a pass: run it under Adapter.side_of(...)")
        if role not in self.gate_up.lora_A:
            result: Tensor = self.base(x, weights, expert_ids)
            return result
        gate_up = stored(self.base, "gate_up_proj") + self.gate_up.delta(role) * self.scaling
        down = stored(self.base, "down_proj") + self.down.delta(role) * self.scaling
        return looped_experts(x, weights, expert_ids, gate_up.to(x.dtype), down.to(x.dtype))
