"""The building blocks of a DiffusionGemma layer: norms, rotary embedding, MLPs, router and experts.

Each module is written against the reference (transformers 5.23, `modeling_diffusion_gemma.py`);
parameter names match the checkpoint's so the loader can assign tensors by name. Every projection a
quantized checkpoint may store differently (`Linear`, `Experts`) holds a weight method chosen at load
(`engine.model.methods`): the method registers the parameters and computes the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig, RopeSpec
from engine.model.methods.base import ExpertsMethod, LinearMethod
from engine.model.methods.plain import gelu_tanh
from engine.model.methods.selection import WeightMethods


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight`, computed in fp32 and cast back (`rms_norm_reference`).

    The weight is used as is (no `1 + w` as in Gemma 1-3). `with_scale=False` has no parameter.
    `forward` is torch's `F.rms_norm`, one op instead of nine: it computes the same in fp32 for bf16
    inputs, bit for bit (tests/engine/test_layers_fast_paths.py), and the small Sudoku model's step is
    mostly per-op overhead.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """The reference's RMSNorm written out: fp32 `h * (mean(h^2) + eps)^-0.5 * weight`, cast back."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


class Linear(nn.Module):
    """A projection without bias, x (..., in) -> (..., out); its `method` owns the weights' layout."""

    def __init__(self, in_features: int, out_features: int, method: LinearMethod) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        method.create_weights(self, in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.method.apply(self, x)


class GatedMLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`: the dense MLP of every layer and the self-conditioning MLP.

    `prefix` is the module's name in the model (e.g. `layers.3.mlp`), which picks each projection's method.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, methods: WeightMethods, prefix: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, methods.linear_for(f"{prefix}.gate_proj"))
        self.up_proj = Linear(hidden_size, intermediate_size, methods.linear_for(f"{prefix}.up_proj"))
        self.down_proj = Linear(intermediate_size, hidden_size, methods.linear_for(f"{prefix}.down_proj"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class SelfConditioning(GatedMLP):
    """Decoder input: `rms_noscale(embeds + mlp(rms(soft_embeds, pre_norm)))`.

    `soft_embeds` is the previous step's softmax-weighted embedding. On a canvas's first step it is
    zero, where the MLP outputs exactly zero (no biases), so `None` skips the MLP with the same result.
    """

    def __init__(
        self, config: ModelConfig, methods: WeightMethods, prefix: str = "self_conditioning"
    ) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, methods, prefix)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: Tensor, soft_embeds: Tensor | None = None) -> Tensor:
        if soft_embeds is None:
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))


class Router(nn.Module):
    """Softmax over experts of a scaled, normed residual; top-k, renormalised, times a per-expert scale."""

    def __init__(self, config: ModelConfig, methods: WeightMethods, prefix: str) -> None:
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = Linear(config.hidden_size, config.num_experts, methods.linear_for(f"{prefix}.proj"))
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(T, H) -> weights (T, k) fp32, expert ids (T, k)."""
        z = self.norm(residual) * self.scale * self.root_size
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)  # (T, E)
        weights, expert_ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[expert_ids], expert_ids


class Experts(nn.Module):
    """The MoE experts. Plain weights: `gate_up_proj` (E, 2I, H), gate rows first; `down_proj` (E, H, I)."""

    def __init__(self, config: ModelConfig, method: ExpertsMethod) -> None:
        super().__init__()
        self.method = method
        method.create_weights(self, config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        """Sum over each token's k experts of `weight * expert(x)`: x (T, H), weights and ids (T, k)."""
        return self.method.apply(self, x, weights, expert_ids)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> Tensor:
    """Inverse frequencies of length head_dim / 2 (fp32).

    Proportional RoPE rotates only `n = int(partial * head_dim // 2)` frequency pairs, with exponents
    over the full head_dim, and pads with zeros (cos 1, sin 0). Example, head_dim 512, partial 0.25:
    64 frequencies `1/theta^(2j/512)`, then 192 zeros; after duplication dims [0:64) and [256:320) rotate.
    """
    if spec.rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (spec.theta**exponents)
    num_rotated = int(spec.partial_rotary_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * num_rotated, 2, dtype=torch.int64).float() / head_dim
    rotated = 1.0 / (spec.theta**exponents)
    padding = torch.zeros(head_dim // 2 - num_rotated)
    return torch.cat([rotated, padding]) / spec.factor


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim), computed in fp32 and cast to `dtype`."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()  # (T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x (T, heads, d) with cos/sin (T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
