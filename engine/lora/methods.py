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

from engine.lora.delta import add_lora_delta
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
        self._add_delta(layer, x, y)
        return y

    @torch._dynamo.disable  # type: ignore[untyped-decorator]
    def _add_delta(self, layer: nn.Module, x: Tensor, y: Tensor) -> None:
        """Add this step's adapter deltas to `y` in place. Never compiled (`--compile`): it reads the
        step's runs, which change every step, so a compiled layer calls it eagerly between its graphs."""
        runs = self.context.runs(self.decoder_tokens)
        stack = _stack(layer, "lora")
        if runs is None or runs.rows.isdisjoint(stack.ranks):
            return
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # (N, in), (N, out)
        add_lora_delta(flat_y, flat_x, stack.a, stack.b, runs, stack.ranks)


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
    """The reference MoE loop with each token's adapter delta on both weights: x (T, H), weights and ids
    (T, k) -> (T, H). Routed tokens are sorted by (expert, adapter row), one host sync for the counts,
    so each expert's tokens of one row are a contiguous slice that takes that row's delta.

    Example, 2 experts, rows {-1, 0}: keys expert * 2 + (row != -1 ? 1 + index of row : 0); counts
    [3, 1, 0, 2] mean expert 0 has 3 base tokens then 1 of row 0, expert 1 has 2 of row 0.
    """
    rows = sorted(runs.rows)
    num_groups = len(rows) + 1  # the base, then each adapter row of the step
    lookup = torch.zeros(max(rows) + 2, dtype=torch.long, device=x.device)  # row + 1 -> group
    lookup[torch.tensor(rows, device=x.device) + 1] = torch.arange(1, num_groups, device=x.device)
    k = expert_ids.shape[1]
    groups = lookup[runs.token_rows.long() + 1].repeat_interleave(k)  # (T*k,) each assignment's group
    keys = expert_ids.flatten() * num_groups + groups
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=gate_up_proj.shape[0] * num_groups).tolist()
    token_ids = order // k
    flat_weights = weights.flatten()[order]
    out = torch.zeros_like(x)  # (T, H)
    start = 0
    for e in range(gate_up_proj.shape[0]):
        sizes = counts[e * num_groups : (e + 1) * num_groups]
        if sum(sizes):
            end = start + sum(sizes)
            pieces = list(zip([-1, *rows], sizes, strict=True))  # (row, count), the base first
            tokens = token_ids[start:end]
            fused = _with_deltas(x[tokens], gate_up_proj[e], gate_up, e, pieces)  # (c, 2I)
            gate, up = fused.chunk(2, dim=-1)
            y = _with_deltas(gelu_tanh(gate) * up, down_proj[e], down, e, pieces)  # (c, H)
            out.index_add_(0, tokens, (y * flat_weights[start:end, None]).to(out.dtype))
            start = end
    return out


def _with_deltas(
    x: Tensor, weight: Tensor, stack: LoRAStack, expert: int, pieces: list[tuple[int, int]]
) -> Tensor:
    """x (c, in) @ weight.T, plus on each piece (row, count) of consecutive tokens that row's delta
    (none for the base's row -1 and rows this weight has no adapter in)."""
    y = F.linear(x, weight)  # (c, out)
    start = 0
    for row, count in pieces:
        rank = stack.ranks.get(row)
        if count and rank is not None:
            shrunk = x[start : start + count] @ stack.a[row, expert, :rank].T  # (n, r)
            y[start : start + count] += shrunk @ stack.b[row, expert, :, :rank].T
        start += count
    return y


def enable_lora(
    model: DiffusionGemma, targets: dict[str, Target], max_loras: int, max_rank: int
) -> tuple[LoRAContext, dict[str, LoRAStack]]:
    """Give every target of `model` a zero `LoRAStack` of `2 * max_loras` rows and wrap its method.

    Returns the context the wrappers read and the stacks by target name (`model_targets`' names). A
    model that already serves LoRA (an engine built on it before) is refused: its wrapped experts would
    no longer be targets, and its linears would nest a second wrapper around the first.
    """
    if any(isinstance(getattr(m, "method", None), LoRALinear | LoRAExperts) for m in model.modules()):
        raise ValueError("LoRA is already enabled on this model: build each LoRA engine on its own copy")
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
