"""The building blocks of a DiffusionGemma layer: norms, rotary embedding, MLPs, router and experts.

Each module is written against the reference (transformers 5.23, `modeling_diffusion_gemma.py`);
parameter names match the checkpoint's so the loader can assign tensors by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig, RopeSpec
from engine.kernels.dispatch import use_kernels
from engine.kernels.grouped_experts import grouped_experts, grouped_mm_fits


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight`, computed in fp32 and cast back.

    The weight is used as is (no `1 + w` as in Gemma 1-3). `with_scale=False` has no parameter.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`: the dense MLP of every layer and the self-conditioning MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class SelfConditioning(GatedMLP):
    """Decoder input: `rms_noscale(embeds + mlp(rms(soft_embeds, pre_norm)))`.

    `soft_embeds` is the previous step's softmax-weighted embedding. On a canvas's first step it is
    zero, where the MLP outputs exactly zero (no biases), so `None` skips the MLP with the same result.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: Tensor, soft_embeds: Tensor | None = None) -> Tensor:
        if soft_embeds is None:
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))


class Router(nn.Module):
    """Softmax over experts of a scaled, normed residual; top-k, renormalised, times a per-expert scale."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
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
    """Fused expert weights: `gate_up_proj` (E, 2I, H) with gate rows first, `down_proj` (E, H, I)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        num, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, inter))

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        """Sum over each token's k experts of `weight * expert(x)`: x (T, H), weights and ids (T, k).

        On CUDA (and under `engine.kernels.dispatch.force(True)`) two grouped matmuls do all experts at
        once (`engine.kernels.grouped_experts`); otherwise `looped` is the reference.
        """
        if use_kernels(x.device) and grouped_mm_fits(x, self.gate_up_proj, self.down_proj):
            return grouped_experts(x, weights, expert_ids, self.gate_up_proj, self.down_proj)
        return self.looped(x, weights, expert_ids)

    def looped(self, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        """The reference: tokens grouped by expert, one expert at a time (a host sync for the counts)."""
        out = torch.zeros_like(x)  # (T, H)
        flat_experts = expert_ids.flatten()  # (T*k,)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.gate_up_proj.shape[0]).tolist()
        token_ids = order // expert_ids.shape[1]
        flat_weights = weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = token_ids[start : start + count]
                y = self._expert(x[rows], expert) * flat_weights[start : start + count, None]
                out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out

    def _expert(self, x: Tensor, expert: int) -> Tensor:
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(gelu_tanh(gate) * up, self.down_proj[expert])


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
