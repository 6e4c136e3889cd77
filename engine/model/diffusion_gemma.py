"""The DiffusionGemma text trunk: one set of weights run in two modes over one flat batch.

Causal segments (encoder mode) embed their tokens and write K/V into the paged cache; bidirectional
segments (decoder mode) add the self-conditioning input, read the cache and produce the hidden states
that the sampler turns into logits. The two modes differ only in attention masking, the per-layer
`layer_scalar` and the decoder's input block, so every projection, MLP and expert runs once over the
whole batch.

The model never sees a request: only token ids, positions, segments and cache tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.config import LayerSpec, ModelConfig
from engine.model.attention import LayerCache, Segment, attend
from engine.model.layers import (
    Experts,
    GatedMLP,
    RMSNorm,
    Router,
    SelfConditioning,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)


@dataclass
class ForwardBatch:
    """One step's flat batch. Tokens are ordered segment by segment.

    `soft_embeds` holds the self-conditioning input of the decoder tokens only, in token order
    (T_dec, H); rows of a canvas on its first step are zero. `None` means zeros for all of them.
    """

    input_ids: Tensor  # (T,) long
    positions: Tensor  # (T,) long
    segments: list[Segment]
    soft_embeds: Tensor | None = None

    def decoder_mask(self) -> Tensor:
        """(T,) bool: True for tokens of bidirectional segments."""
        flags = [not s.is_causal for s in self.segments for _ in range(s.num_tokens)]
        return torch.tensor(flags, dtype=torch.bool, device=self.input_ids.device)


class Attention(nn.Module):
    """Gemma-4 attention: q/k norms then RoPE, V normed without weight, K = V on full layers, scale 1."""

    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        hidden, heads, kv_width = config.hidden_size, config.num_heads, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(hidden, heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(hidden, kv_width, bias=False) if spec.has_v_proj else None
        self.o_proj = nn.Linear(heads * spec.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(spec.head_dim, config.rms_norm_eps, with_scale=False)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], segments: list[Segment], cache: LayerCache
    ) -> Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, -1, self.head_dim)  # (T, heads, d)
        raw_k = self.k_proj(x).view(num_tokens, -1, self.head_dim)  # (T, kv_heads, d)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(num_tokens, -1, self.head_dim)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(raw_k), *rope)
        v = self.v_norm(raw_v)
        out = attend(q, k, v, segments, cache)  # (T, heads, d)
        return self.o_proj(out.reshape(num_tokens, -1))


class Layer(nn.Module):
    """Attention, then a dense MLP in parallel with the MoE, then the mode's `layer_scalar`.

    `layer_scalar` is the decoder's scalar and `encoder_layer_scalar` the encoder's (the only encoder
    weights that are not tied to the decoder's).
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec)
        self.mlp = GatedMLP(hidden, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
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
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        is_decoder: Tensor,
        segments: list[Segment],
        cache: LayerCache,
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, segments, cache)
        residual = x + self.post_attention_layernorm(attn)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        moe = self.post_feedforward_layernorm_2(self._moe(residual))
        x = residual + self.post_feedforward_layernorm(dense + moe)
        return x * torch.where(is_decoder[:, None], self.layer_scalar, self.encoder_layer_scalar)

    def _moe(self, residual: Tensor) -> Tensor:
        """The router reads the raw residual; the experts read it through pre_feedforward_layernorm_2."""
        weights, expert_ids = self.router(residual)
        return self.experts(self.pre_feedforward_layernorm_2(residual), weights, expert_ids)


class DiffusionGemma(nn.Module):
    """The text trunk. `forward` returns the final-normed hidden states of the decoder tokens.

    The LM head is tied to `embed_tokens.weight`; logits, their soft-cap and the sampler live in
    `engine.sampler`, which computes them tile by tile.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
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
        x = self._embed(batch, is_decoder)
        ropes = self._ropes(batch.positions, x.dtype)
        for layer, spec, cache in zip(self.layers, self.config.layers, caches, strict=True):
            x = layer(x, ropes[spec.kind], is_decoder, batch.segments, cache)
        return self.norm(x[is_decoder])

    def _embed(self, batch: ForwardBatch, is_decoder: Tensor) -> Tensor:
        x = self.embed_tokens(batch.input_ids) * self.embed_scale  # (T, H)
        if bool(is_decoder.any()):
            x = x.clone()
            x[is_decoder] = self.self_conditioning(x[is_decoder], batch.soft_embeds)
        return x

    def _ropes(self, positions: Tensor, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            kind: rope_cos_sin(getattr(self, f"{kind}_inv_freq"), positions, dtype)
            for kind in self.rope_kinds
        }
