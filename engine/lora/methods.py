"""LoRA through the weight-method seam: `LoRALinear` and `LoRAExperts` wrap a module's base method.

`enable_lora(model, ...)` runs once on a loaded model: every target module (`model_targets`) gets a
`LoRAStack` (`layer.lora`; experts `layer.lora_gate_up` and `layer.lora_down`) and its method
wrapped, so layers keep one `forward` line and gain no branch. A wrapper reads the step's
`LoRAIndex` from the shared `LoRAContext`, which the runner sets around each forward: no index (a
base-only step) or no populated row among the step's rows returns the base method's output as is.

A linear adds the segmented delta to its base output (`engine.lora.delta`). Experts cannot add after
the fact (the activation sits between the two weights): with an adapter row on either weight in the
step they run the reference loop over experts with each weight's delta inside it; otherwise the
base method (looped or grouped) runs untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.lora.delta import add_lora_delta, expert_lora_delta
from engine.lora.index import LoRAIndex, LoRARuns
from engine.lora.stack import LoRAStack
from engine.lora.targets import ExpertsTarget, LinearTarget, Target, decoder_only
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.methods.base import ExpertsMethod, LinearMethod, stored
from engine.model.methods.plain import gelu_tanh


@dataclass
class LoRAContext:
    """The current forward's adapter rows (None between forwards and for base-only steps)."""

    index: LoRAIndex | None = None

    def runs(self, decoder_tokens: bool) -> LoRARuns | None:
        if self.index is None:
            return None
        return self.index.decoder if decoder_tokens else self.index.tokens


def _stack(layer: nn.Module, name: str) -> LoRAStack:
    stack = getattr(layer, name)
    assert isinstance(stack, LoRAStack), f"{type(layer).__name__} has no LoRA stack {name}"
    return stack


class LoRALinear(LinearMethod):
    """The base method's output plus, per run of the step, that adapter's delta (`layer.lora`).

    `decoder_tokens`: the module sees only the decoder tokens (the self-conditioning MLP).
    """

    def __init__(self, base: LinearMethod, context: LoRAContext, decoder_tokens: bool) -> None:
        self.base = base
        self.context = context
        self.decoder_tokens = decoder_tokens

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        self.base.create_weights(layer, in_features, out_features)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def load_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        return self.base.load_dtype(name, model_dtype)

    def keeps_stored_dtype(self, name: str) -> bool:
        return self.base.keeps_stored_dtype(name)

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        y = self.base.apply(layer, x)
        runs = self.context.runs(self.decoder_tokens)
        stack = _stack(layer, "lora")
        if runs is None or runs.rows.isdisjoint(stack.ranks):
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # (N, in), (N, out)
        add_lora_delta(flat_y, flat_x, stack.a, stack.b, runs, stack.ranks)
        return y


class LoRAExperts(ExpertsMethod):
    """Plain experts with each token's adapter on `gate_up_proj` and `down_proj` (the reference loop)."""

    def __init__(self, base: ExpertsMethod, context: LoRAContext) -> None:
        self.base = base
        self.context = context

    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, inter: int) -> None:
        self.base.create_weights(layer, num_experts, hidden, inter)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        runs = self.context.runs(decoder_tokens=False)
        gate_up, down = _stack(layer, "lora_gate_up"), _stack(layer, "lora_down")
        if runs is None or (runs.rows.isdisjoint(gate_up.ranks) and runs.rows.isdisjoint(down.ranks)):
            return self.base.apply(layer, x, weights, expert_ids)
        return _experts_with_lora(
            x,
            weights,
            expert_ids,
            stored(layer, "gate_up_proj"),
            stored(layer, "down_proj"),
            gate_up,
            down,
            runs,
        )


def _experts_with_lora(
    x: Tensor,
    weights: Tensor,
    expert_ids: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    gate_up: LoRAStack,
    down: LoRAStack,
    runs: LoRARuns,
) -> Tensor:
    """The reference MoE loop (tokens grouped by expert) with each token's adapter delta on both weights:
    x (T, H), weights and ids (T, k) -> (T, H)."""
    out = torch.zeros_like(x)  # (T, H)
    flat_experts = expert_ids.flatten()  # (T*k,)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=gate_up_proj.shape[0]).tolist()
    token_ids = order // expert_ids.shape[1]
    flat_weights = weights.flatten()[order]
    token_rows = runs.token_rows[token_ids]  # (T*k,) each routed token's adapter row
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows, adapter_rows = token_ids[start : start + count], token_rows[start : start + count]
            rows_x = x[rows]  # (c, H)
            fused = F.linear(rows_x, gate_up_proj[e])
            fused = fused + expert_lora_delta(
                rows_x, gate_up.a[:, e], gate_up.b[:, e], adapter_rows, gate_up.ranks
            )
            gate, up = fused.chunk(2, dim=-1)
            hidden = gelu_tanh(gate) * up  # (c, I)
            y = F.linear(hidden, down_proj[e])
            y = y + expert_lora_delta(hidden, down.a[:, e], down.b[:, e], adapter_rows, down.ranks)
            out.index_add_(0, rows, (y * flat_weights[start : start + count, None]).to(out.dtype))
        start += count
    return out


def enable_lora(
    model: DiffusionGemma, targets: dict[str, Target], max_loras: int, max_rank: int
) -> tuple[LoRAContext, dict[str, LoRAStack]]:
    """Give every target of `model` a zero `LoRAStack` of `2 * max_loras` rows and wrap its method.

    Returns the context the wrappers read and the stacks by target name (`model_targets`' names).
    """
    context = LoRAContext()
    weight = model.embed_tokens.weight
    stacks: dict[str, LoRAStack] = {}
    for name, target in targets.items():
        experts = target.num_experts if isinstance(target, ExpertsTarget) else None
        stacks[name] = LoRAStack.zeros(
            2 * max_loras,
            max_rank,
            target.in_features,
            target.out_features,
            experts,
            weight.dtype,
            weight.device,
        )
    for name, module in model.named_modules():
        if name in targets and isinstance(targets[name], LinearTarget):
            module.lora = stacks[name]
            module.method = LoRALinear(module.method, context, decoder_only(name))
        elif f"{name}.gate_up_proj" in targets:
            module.lora_gate_up = stacks[f"{name}.gate_up_proj"]
            module.lora_down = stacks[f"{name}.down_proj"]
            module.method = LoRAExperts(module.method, context)
    return context, stacks
