"""The unquantized methods: plain linear, and the experts looped (reference) or as two grouped matmuls.

Parameters keep the checkpoint's names and layouts (`weight` (out, in); `gate_up_proj` (E, 2I, H),
`down_proj` (E, H, I)), so `state_dict()` names equal the checkpoint's (minus its prefix).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.kernels.gelu import GELU_INNER as GELU_INNER  # re-exported: the model's GELU lives there
from engine.kernels.gelu import gelu_tanh as gelu_tanh
from engine.kernels.gelu import gelu_tanh_by_sigmoid as gelu_tanh_by_sigmoid
from engine.kernels.grouped_experts import grouped_experts, grouped_mm_fits
from engine.model.methods.base import ExpertsMethod, LinearMethod, stored


class UnquantizedLinear(LinearMethod):
    """`F.linear(x, weight)`; `weight` (out, in) initialised as `nn.Linear` does (loads overwrite it)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, stored(layer, "weight"))


class LoopedExperts(ExpertsMethod):
    """The reference: tokens grouped by expert, one expert at a time (a host sync for the counts)."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, inter: int) -> None:
        layer.register_parameter("gate_up_proj", nn.Parameter(torch.empty(num_experts, 2 * inter, hidden)))
        layer.register_parameter("down_proj", nn.Parameter(torch.empty(num_experts, hidden, inter)))

    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        return looped_experts(
            x, weights, expert_ids, stored(layer, "gate_up_proj"), stored(layer, "down_proj")
        )


CPU_GROUPED_MAX_ROWS = 8192
"""Above this many (token, expert) rows a step, the CPU's grouped fallback is slower than the loop (one
layer of the bench model, bf16, 2-core Xeon: 1.33x / 1.11x / 0.96x the loop at 1,024 / 4,096 / 16,384
rows; 128 experts top-8 at H 2,816: 1.17x / 1.04x / 0.91x at 2,048 / 8,192 / 32,768; bench/cpu_paths.py).
Eager only: compiled layers (`--compile`) group at every size, since the loop's host sync would split
the layer's graph (the bench model's 16-canvas forward, 16,384 rows: 392 ms grouped, 419 ms looped)."""


class GroupedExperts(LoopedExperts):
    """The same weights through `engine.kernels.grouped_experts` (two grouped matmuls, no host sync).

    Chosen at load where `grouped_mm` takes the device, dtype and widths
    (`engine.model.methods.selection`); the reference loop stays `LoopedExperts`.
    """

    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        if not self.groups(layer, x, expert_ids):
            return super().apply(layer, x, weights, expert_ids)
        return grouped_experts(
            x, weights, expert_ids, stored(layer, "gate_up_proj"), stored(layer, "down_proj")
        )

    @staticmethod
    def groups(layer: nn.Module, x: Tensor, expert_ids: Tensor) -> bool:
        """Whether this call runs grouped: `grouped_mm` takes it (torch's CPU fallback has no weight
        gradient, so a training step there, grad mode being a fact of the call, loops), and on the CPU
        the step is compiled or has at most `CPU_GROUPED_MAX_ROWS` rows."""
        if not grouped_mm_fits(x, stored(layer, "gate_up_proj"), stored(layer, "down_proj")):
            return False
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return True
        return expert_ids.numel() <= CPU_GROUPED_MAX_ROWS


class DenseExperts(LoopedExperts):
    """Every expert on every token, weighted by the routing (zero for the experts a token did not pick).

    `num_experts / top_k` times the expert arithmetic of the loop, but a fixed sequence of ops with
    no host sync and no data-dependent shapes: what a compiler can fuse. Worth it only for a few
    experts under `torch.compile` (`engine.model.compiled`); the same weights as the loop.
    """

    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        return dense_experts(
            x, weights, expert_ids, stored(layer, "gate_up_proj"), stored(layer, "down_proj")
        )


def dense_experts(
    x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """`looped_experts`' result through batched matmuls over all E experts: x (T, H) -> (T, H).

    A token's terms are added in expert order, as the loop's `index_add_` adds them, and the zero
    terms of the experts it did not pick add nothing.
    """
    combine = torch.zeros(x.shape[0], gate_up_proj.shape[0], dtype=weights.dtype, device=x.device)
    combine.scatter_(1, expert_ids, weights)  # (T, E)
    gate, up = torch.matmul(x.unsqueeze(0), gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # (E, T, I)
    y = torch.matmul(gelu_tanh(gate) * up, down_proj.transpose(1, 2))  # (E, T, H)
    weighted = (y * combine.t().unsqueeze(-1)).to(x.dtype)  # (E, T, H)
    out = weighted[0]
    for expert in range(1, weighted.shape[0]):
        out = out + weighted[expert]
    return out


def looped_experts(
    x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """Sum over each token's k experts of `weight * expert(x)`: x (T, H), weights and ids (T, k)."""

    def expert(rows_x: Tensor, index: int) -> Tensor:
        gate, up = F.linear(rows_x, gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(gelu_tanh(gate) * up, down_proj[index])

    return route_experts(x, weights, expert_ids, gate_up_proj.shape[0], expert)


def route_experts(
    x: Tensor, weights: Tensor, expert_ids: Tensor, num_experts: int, expert: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """The reference MoE loop for any weight format: tokens grouped by expert (one host sync for the
    counts), `expert(x[rows], e)` (c, H) once per expert that received tokens, weighted and summed back
    into (T, H)."""
    out = torch.zeros_like(x)  # (T, H)
    flat_experts = expert_ids.flatten()  # (T*k,)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    token_ids = order // expert_ids.shape[1]
    flat_weights = weights.flatten()[order]
    start = 0
    for index, count in enumerate(counts):
        if count:
            rows = token_ids[start : start + count]
            y = expert(x[rows], index) * flat_weights[start : start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out
