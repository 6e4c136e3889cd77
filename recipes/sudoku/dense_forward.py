"""A training forward over fixed-shape examples that runs the engine's own modules.

Every training example has the same shape: a causal prompt segment (positions 0..P-1) followed by a
bidirectional canvas segment (positions P..P+C-1). The engine's `DiffusionGemma.forward` runs such a
batch as a flat list of segments over a paged cache; here the same layers run on a dense (B, S, H)
batch with one (S, S) attention mask, which autograd handles cheaply. Projections, norms, MLPs, router,
experts, self-conditioning, `layer_scalar`s, RoPE and the tied head are the engine's modules and weights,
so training and serving share one model definition; tests/recipes/test_dense_forward.py checks that
this forward equals the engine's paged forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LayerKind
from engine.model.diffusion_gemma import Attention, DiffusionGemma, Layer
from engine.model.layers import apply_rope, rope_cos_sin
from engine.sampler import LMHead


def attention_mask(num_prompt: int, num_canvas: int, window: int | None, device: torch.device) -> Tensor:
    """(S, S) bool, True where a query may attend, with the engine's semantics.

    Prompt rows are causal (sliding layers: only keys > q - W). Canvas rows see the prompt positions a
    bidirectional segment reads from the cache (sliding: the last W - 1 of them) and the whole canvas.
    Example, P=3, C=2, full: rows 0..2 lower-triangular over columns 0..2; rows 3..4 all True.
    """
    size = num_prompt + num_canvas
    pos = torch.arange(size, device=device)
    mask = pos[None, :] <= pos[:, None]  # causal
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    first_visible = 0 if window is None else max(0, num_prompt - window + 1)
    mask[num_prompt:] = pos[None, :] >= first_visible
    return mask


def _attention(attn: Attention, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
    """`engine.model.diffusion_gemma.Attention.forward` on (B, S, H) with a dense mask."""
    batch, size, _ = x.shape
    q = attn.q_proj(x).view(batch, size, -1, attn.head_dim)  # (B, S, heads, d)
    raw_k = attn.k_proj(x).view(batch, size, -1, attn.head_dim)  # (B, S, kv_heads, d)
    raw_v = raw_k if attn.v_proj is None else attn.v_proj(x).view(batch, size, -1, attn.head_dim)
    q = apply_rope(attn.q_norm(q), *rope)
    k = apply_rope(attn.k_norm(raw_k), *rope)
    v = attn.v_norm(raw_v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, heads, S, d)
        k.transpose(1, 2),  # (B, kv_heads, S, d)
        v.transpose(1, 2),
        attn_mask=mask,
        scale=1.0,
        enable_gqa=True,
    )
    return attn.o_proj(out.transpose(1, 2).reshape(batch, size, -1))


@torch.compiler.disable
def _moe(layer: Layer, flat: Tensor) -> Tensor:
    """Router and experts, always eager: the experts group tokens by a host-side count whose values
    change every step, so a compiled version would recompile at every batch."""
    return layer._moe(flat)  # (T, H)


def layer_forward(
    layer: Layer, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, is_decoder: Tensor
) -> Tensor:
    """`engine.model.diffusion_gemma.Layer.forward` on (B, S, H); `is_decoder` is (S,) bool."""
    attn = _attention(layer.self_attn, layer.input_layernorm(x), rope, mask)
    residual = x + layer.post_attention_layernorm(attn)
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(residual)))
    flat = residual.reshape(-1, residual.shape[-1])  # (B*S, H): router and experts take tokens
    moe = layer.post_feedforward_layernorm_2(_moe(layer, flat)).view_as(residual)
    x = residual + layer.post_feedforward_layernorm(dense + moe)
    return x * torch.where(is_decoder[:, None], layer.layer_scalar, layer.encoder_layer_scalar)  # (S, 1)


LayerForward = Callable[[Layer, Tensor, tuple[Tensor, Tensor], Tensor, Tensor], Tensor]


def compiled_layer_forward() -> LayerForward:
    """`layer_forward` through `torch.compile` (inductor, which needs a C compiler on CPU).

    It fuses the norms, RoPE, GELU and residual arithmetic that the eager forward runs as separate
    passes over memory; router and experts stay eager (`_moe`). Measured on an idle 2-core CPU
    (`bench/train_step.py`), the Sudoku model's training step falls from 2.21 s to 1.97 s (2.67 s to
    2.40 s with self-conditioning), after about 34 s of compiling.
    """
    return torch.compile(layer_forward, dynamic=False)  # type: ignore[return-value]


def dense_forward(
    model: DiffusionGemma,
    prompts: Tensor,
    canvases: Tensor,
    soft_embeds: Tensor | None = None,
    forward_layer: LayerForward = layer_forward,
) -> Tensor:
    """prompts (B, P), canvases (B, C) long, soft_embeds (B, C, H) or None -> canvas hidden (B, C, H).

    The result is final-normed, like `DiffusionGemma.forward`'s decoder rows; feed it to `head_logits`.
    """
    num_prompt, num_canvas = prompts.shape[1], canvases.shape[1]
    device = prompts.device
    embeds = model.embed_tokens(torch.cat([prompts, canvases], dim=1)) * model.embed_scale  # (B, S, H)
    canvas_in = model.self_conditioning(embeds[:, num_prompt:], soft_embeds)
    x = torch.cat([embeds[:, :num_prompt], canvas_in], dim=1)
    positions = torch.arange(num_prompt + num_canvas, device=device)
    is_decoder = positions >= num_prompt
    ropes: dict[LayerKind, tuple[Tensor, Tensor]] = {}
    masks: dict[LayerKind, Tensor] = {}
    for kind in model.rope_kinds:
        ropes[kind] = rope_cos_sin(getattr(model, f"{kind}_inv_freq"), positions, x.dtype)
        window = model.config.sliding_window if kind == "sliding" else None
        masks[kind] = attention_mask(num_prompt, num_canvas, window, device)
    for layer, spec in zip(model.layers, model.config.layers, strict=True):
        x = forward_layer(layer, x, ropes[spec.kind], masks[spec.kind], is_decoder)
    return model.norm(x[:, num_prompt:])


def lm_head(model: DiffusionGemma) -> LMHead:
    """The tied head the engine's sampler uses."""
    return LMHead(model.embed_tokens.weight, model.config.final_logit_softcapping, model.embed_scale)


def head_logits(hidden: Tensor, head: LMHead) -> Tensor:
    """Softcapped fp32 logits, as `engine.sampler.logits_for` computes them but out of place (autograd)."""
    logits = F.linear(hidden, head.weight).float()
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits
