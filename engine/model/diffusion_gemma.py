"""The DiffusionGemma text trunk: one set of weights run in two modes over one flat batch.

Causal segments (encoder mode) embed their tokens and write K/V into the paged cache; bidirectional
segments (decoder mode) add the self-conditioning input, read the cache and produce the hidden states
that the sampler turns into logits. The two modes differ only in attention masking, the per-layer
`layer_scalar` and the decoder's input block, so every projection, MLP and expert runs once over the
whole batch.

The model never sees a request: only token ids, positions, segments and cache tensors. Attention runs
through the backend bound in `ForwardBatch.attention` (`engine.attention`), each projection through the
weight method chosen at construction (`engine.model.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from engine.attention.base import BoundAttention
from engine.attention.selection import select_attention_backend
from engine.attention.types import LayerCache, Segment
from engine.config import LayerSpec, ModelConfig
from engine.model.layers import (
    Experts,
    GatedMLP,
    Linear,
    RMSNorm,
    Router,
    SelfConditioning,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from engine.model.methods.selection import WeightMethods

Rope = tuple[Tensor, Tensor]


@dataclass
class ForwardBatch:
    """One step's flat batch. Tokens are ordered segment by segment.

    `soft_embeds` holds the self-conditioning input of the decoder tokens only, in token order
    (T_dec, H); rows of a canvas on its first step are zero. `None` means zeros for all of them.
    `attention` is the backend the runner chose, bound to this batch's metadata (prepared once for all
    layers); `None` lets the model bind the device's default backend (tests and benchmarks).
    """

    input_ids: Tensor  # (T,) long
    positions: Tensor  # (T,) long
    segments: list[Segment]
    soft_embeds: Tensor | None = None
    attention: BoundAttention[Any] | None = None

    def decoder_mask(self) -> Tensor:
        """(T,) bool: True for tokens of bidirectional segments."""
        flags = [not s.is_causal for s in self.segments for _ in range(s.num_tokens)]
        return torch.tensor(flags, dtype=torch.bool, device=self.input_ids.device)


class Attention(nn.Module):
    """Gemma-4 attention: q/k norms then RoPE, V normed without weight, K = V on full layers, scale 1.

    `project` and `output` are the parts around the attention itself; the engine runs them around the
    paged backend (`forward`), the training recipe around dense SDPA.
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec, methods: WeightMethods, prefix: str) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        hidden, heads, kv_width = config.hidden_size, config.num_heads, spec.num_kv_heads * spec.head_dim
        self.q_proj = Linear(hidden, heads * spec.head_dim, methods.linear_for(f"{prefix}.q_proj"))
        self.k_proj = Linear(hidden, kv_width, methods.linear_for(f"{prefix}.k_proj"))
        self.v_proj = (
            Linear(hidden, kv_width, methods.linear_for(f"{prefix}.v_proj")) if spec.has_v_proj else None
        )
        self.o_proj = Linear(heads * spec.head_dim, hidden, methods.linear_for(f"{prefix}.o_proj"))
        self.q_norm = RMSNorm(spec.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(spec.head_dim, config.rms_norm_eps, with_scale=False)

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., T, H) -> q (..., T, heads, d), k and v (..., T, kv_heads, d): normed, RoPE on q and k.

        `rope` is cos, sin (T, d) of the tokens' positions.
        """
        heads_shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(heads_shape)
        raw_k = self.k_proj(x).view(heads_shape)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(heads_shape)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(raw_k), *rope)
        return q, k, self.v_norm(raw_v)

    def output(self, out: Tensor) -> Tensor:
        """The attention output (..., heads, d) through o_proj -> (..., H)."""
        return self.o_proj(out.flatten(-2))

    def forward(self, x: Tensor, rope: Rope, attention: BoundAttention[Any], cache: LayerCache) -> Tensor:
        """x (T, H) -> (T, H) over the paged cache through the bound backend."""
        q, k, v = self.project(x, rope)
        return self.output(attention(q, k, v, cache))  # attention: (T, heads, d)


class Layer(nn.Module):
    """Attention, then a dense MLP in parallel with the MoE, then the mode's `layer_scalar`.

    `layer_scalar` is the decoder's scalar and `encoder_layer_scalar` the encoder's (the only encoder
    weights that are not tied to the decoder's).
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec, methods: WeightMethods, prefix: str) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec, methods, f"{prefix}.self_attn")
        self.mlp = GatedMLP(hidden, config.intermediate_size, methods, f"{prefix}.mlp")
        self.router = Router(config, methods, f"{prefix}.router")
        self.experts = Experts(config, methods.experts_for(f"{prefix}.experts"))
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = nn.Buffer(torch.ones(1))
        self.encoder_layer_scalar = nn.Buffer(torch.ones(1))

    def forward(
        self, x: Tensor, rope: Rope, is_decoder: Tensor, attention: BoundAttention[Any], cache: LayerCache
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, attention, cache)
        return self.feed_forward(x, attn) * self.mode_scalar(is_decoder)

    def feed_forward(self, x: Tensor, attn: Tensor, moe: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Everything after attention but the mode's scalar: x and the attention output (..., H) -> (..., H).

        The dense MLP runs beside the MoE on the post-attention residual. `moe` replaces `self.moe`
        (the training recipe passes it wrapped to stay out of `torch.compile`).
        """
        residual = x + self.post_attention_layernorm(attn)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        flat = residual.reshape(-1, residual.shape[-1])  # (T, H): router and experts take tokens
        sparse = self.post_feedforward_layernorm_2((moe or self.moe)(flat)).view_as(residual)
        return residual + self.post_feedforward_layernorm(dense + sparse)

    def moe(self, residual: Tensor) -> Tensor:
        """(T, H) -> (T, H). The router reads the raw residual; the experts read it through
        pre_feedforward_layernorm_2."""
        weights, expert_ids = self.router(residual)
        return self.experts(self.pre_feedforward_layernorm_2(residual), weights, expert_ids)

    def mode_scalar(self, is_decoder: Tensor) -> Tensor:
        """(T, 1): `layer_scalar` for decoder tokens, `encoder_layer_scalar` for encoder tokens."""
        return torch.where(is_decoder[:, None], self.layer_scalar, self.encoder_layer_scalar)


class DiffusionGemma(nn.Module):
    """The text trunk. `forward` returns the final-normed hidden states of the decoder tokens.

    The LM head is tied to `embed_tokens.weight`; logits, their soft-cap and the sampler live in
    `engine.sampler`, which computes them tile by tile.
    """

    def __init__(self, config: ModelConfig, methods: WeightMethods | None = None) -> None:
        """`methods` picks each projection's weight method (default: all plain, experts looped)."""
        super().__init__()
        methods = methods or WeightMethods()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Layer(config, spec, methods, f"layers.{i}") for i, spec in enumerate(config.layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config, methods)
        self.rope_kinds = {spec.kind: spec for spec in config.layers}
        self.reset_rope_buffers(self.embed_tokens.weight.device)

    def reset_rope_buffers(self, device: torch.device) -> None:
        """(Re)compute the RoPE inverse frequencies on `device` (after loading from the meta device)."""
        for kind, spec in self.rope_kinds.items():
            inv_freq = rope_inv_freq(spec.rope, spec.head_dim).to(device)
            self.register_buffer(f"{kind}_inv_freq", inv_freq, persistent=False)

    @property
    def embed_scale(self) -> Tensor:
        """sqrt(hidden_size) in the weight dtype (53.0 for hidden 2816 in bf16, as the reference has it)."""
        weight = self.embed_tokens.weight
        return torch.tensor(self.config.hidden_size**0.5, device=weight.device).to(weight.dtype)

    def forward(self, batch: ForwardBatch, caches: list[LayerCache]) -> Tensor:
        """(T,) tokens -> (T_dec, H) hidden states of the decoder tokens; causal segments fill the cache."""
        is_decoder = batch.decoder_mask()
        attention = batch.attention or select_attention_backend(batch.input_ids.device).bind(
            batch.segments, caches
        )
        x = self._embed(batch, is_decoder)
        ropes = self._ropes(batch.positions, x.dtype)
        for layer, spec, cache in zip(self.layers, self.config.layers, caches, strict=True):
            x = layer(x, ropes[spec.kind], is_decoder, attention, cache)
        return self.norm(x[is_decoder])

    def _embed(self, batch: ForwardBatch, is_decoder: Tensor) -> Tensor:
        x = self.embed_tokens(batch.input_ids) * self.embed_scale  # (T, H)
        if bool(is_decoder.any()):
            x = x.clone()
            x[is_decoder] = self.self_conditioning(x[is_decoder], batch.soft_embeds)
        return x

    def _ropes(self, positions: Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        return {
            kind: rope_cos_sin(getattr(self, f"{kind}_inv_freq"), positions, dtype)
            for kind in self.rope_kinds
        }
