"""A projection with LoRA deltas, one per side of the model (the encoder's and the decoder's).

transformers' DiffusionGemma holds the encoder (`model.encoder.language_model.layers.N`, the causal prompt
pass) and the decoder (`model.decoder.layers.N`, the denoise pass) as separate modules over tied base
weights, so a PEFT adapter holds separate LoRA weights for each copy of a projection. Our model has one
set of layers for both passes; `LoRALinear` wraps one of its projections and adds the delta of the side
that the current pass runs (`Side`, shared by every wrapped projection of a model and set by the pass,
`lora_adapter.py`). PEFT's math: `base(x) + B(A(x)) * scaling`, A (r, in), B (out, r). The deltas are
kept in fp32 and run in the activations' dtype (a bf16 base trains fp32 deltas through a bf16 forward).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Role = Literal["encoder", "decoder"]
ROLES: tuple[Role, ...] = ("encoder", "decoder")


def peft_init(lora_a: nn.ParameterDict, lora_b: nn.ParameterDict, generator: torch.Generator) -> None:
    """PEFT's default init of every side's pair: A Kaiming-uniform (a = sqrt(5): bound 1 / sqrt(in)),
    B zero."""
    with torch.no_grad():
        for weight in lora_a.values():
            bound = 1 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound, generator=generator)
        for weight in lora_b.values():
            weight.zero_()


class Side:
    """Which side of the model the running pass is: set around each pass, None outside them."""

    def __init__(self) -> None:
        self.role: Role | None = None


class LoRALinear(nn.Module):
    """`base` (x (..., in) -> (..., out), frozen) plus, for each of `roles`, a rank-r delta.

    A pass of a side the projection has no delta for (the self-conditioning MLP on the encoder side)
    runs the base alone. Outside any pass (`side.role` None) the call is an error: the delta to add
    would be a guess.
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        roles: tuple[Role, ...],
        side: Side,
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.side = side
        self.lora_A = nn.ParameterDict({role: nn.Parameter(torch.empty(rank, in_features)) for role in roles})
        self.lora_B = nn.ParameterDict(
            {role: nn.Parameter(torch.zeros(out_features, rank)) for role in roles}
        )

    def reset(self, generator: torch.Generator) -> None:
        peft_init(self.lora_A, self.lora_B, generator)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.base(x)
        role = self.side.role
        if role is None:
            raise RuntimeError("LoRALinear called outside a pass: run it under Adapter.side_of(...)")
        if role not in self.lora_A:
            return out
        lora_a, lora_b = self.lora_A[role].to(x.dtype), self.lora_B[role].to(x.dtype)
        return out + F.linear(F.linear(x, lora_a), lora_b) * self.scaling
