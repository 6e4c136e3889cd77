"""A training forward over fixed-shape examples that runs the engine's own modules.

Every training example is a causal prompt segment (positions 0..P-1) followed by a bidirectional
canvas segment (positions P..P+C-1). The engine's `DiffusionGemma.forward` runs such a batch as a flat
list of segments over a paged cache; here the same layers run on dense batches, in the engine's order:
`encode_prompts` runs the prompts (B, P) causally and keeps each layer's prompt keys and values, as
prefill fills the cache, and `decode_canvases` runs canvases (B * R, C) over them, R canvases per
prompt. The prompt never sees its canvas, so one encoding serves every canvas drawn for it: R noise
levels of one puzzle, and the self-conditioning pass and the graded pass of one step. Projections,
norms, MLPs, router, experts, self-conditioning, `layer_scalar`s, RoPE and the tied head are the
engine's modules and weights, so training and serving share one model definition;
tests/recipes/test_dense_forward.py checks this forward against the engine's paged forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LayerKind
from engine.model.diffusion_gemma import Attention, DiffusionGemma, Layer
from engine.model.layers import rope_cos_sin
from engine.sampler import LMHead

Rope = tuple[Tensor, Tensor]
PromptLayer = Callable[[Layer, Tensor, Rope, Tensor], tuple[Tensor, Tensor, Tensor]]
CanvasLayer = Callable[[Layer, Tensor, Rope, Tensor, Tensor, Tensor], Tensor]


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


def _project(attn: Attention, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, heads, S, d), k and v (B, kv_heads, S, d): `Attention.project`, heads before positions."""
    q, k, v = attn.project(x, rope)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scale-1 attention of q over k, v under `mask` (Sq, Sk), then o_proj: -> (B, Sq, H)."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    return attn.output(out.to(dtype).transpose(1, 2))


@torch.compiler.disable
def _eager_moe(layer: Layer, flat: Tensor) -> Tensor:
    """`Layer.moe`, always eager: the experts group tokens by a host-side count whose values change
    every step, so a compiled version would recompile at every batch."""
    return layer.moe(flat)  # (T, H)


def _feed_forward(layer: Layer, x: Tensor, attn: Tensor, scalar: Tensor) -> Tensor:
    """`Layer.feed_forward` on (B, S, H) with the MoE kept eager, times the mode's scalar."""
    return layer.feed_forward(x, attn, moe=lambda flat: _eager_moe(layer, flat)) * scalar


def prompt_layer(layer: Layer, x: Tensor, rope: Rope, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One encoder layer over prompts (B, P, H) with a (P, P) mask -> (next x, k, v)."""
    q, k, v = _project(layer.self_attn, layer.input_layernorm(x), rope)
    attn = _attend(layer.self_attn, q, k, v, mask)
    return _feed_forward(layer, x, attn, layer.encoder_layer_scalar), k, v


def canvas_layer(
    layer: Layer, x: Tensor, rope: Rope, mask: Tensor, prompt_k: Tensor, prompt_v: Tensor
) -> Tensor:
    """One decoder layer over canvases (B*R, C, H) reading their prompts' keys and values (B*R, ., P, d)
    and their own, with a (C, P + C) mask."""
    q, k, v = _project(layer.self_attn, layer.input_layernorm(x), rope)
    keys, values = torch.cat([prompt_k, k], dim=2), torch.cat([prompt_v, v], dim=2)
    attn = _attend(layer.self_attn, q, keys, values, mask)
    return _feed_forward(layer, x, attn, layer.layer_scalar)


@dataclass(frozen=True)
class LayerForwards:
    """The per-layer functions the forward runs: eager, or each through `torch.compile`."""

    prompt: PromptLayer = prompt_layer
    canvas: CanvasLayer = canvas_layer


EAGER = LayerForwards()


def compiled_layer_forwards() -> LayerForwards:
    """`prompt_layer` and `canvas_layer` through `torch.compile` (inductor, which needs a C compiler on
    CPU). It fuses the norms, RoPE, GELU and residual arithmetic that the eager forward runs as separate
    passes over memory; router and experts stay eager (`_eager_moe`). Measured in bench/RESULTS.md
    (`bench/train_step.py`)."""
    prompt = torch.compile(prompt_layer, dynamic=False)
    canvas = torch.compile(canvas_layer, dynamic=False)
    return LayerForwards(prompt=prompt, canvas=canvas)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PromptCache:
    """What the canvases read from their prompts: per layer k and v (B, kv_heads, P, d)."""

    keys: list[Tensor]
    values: list[Tensor]

    @property
    def num_prompt(self) -> int:
        return self.keys[0].shape[2]

    def detached(self) -> PromptCache:
        return PromptCache([k.detach() for k in self.keys], [v.detach() for v in self.values])


def _rope(model: DiffusionGemma, kind: LayerKind, positions: Tensor, dtype: torch.dtype) -> Rope:
    return rope_cos_sin(getattr(model, f"{kind}_inv_freq"), positions, dtype)


def _window(model: DiffusionGemma, kind: LayerKind) -> int | None:
    return model.config.sliding_window if kind == "sliding" else None


def encode_prompts(model: DiffusionGemma, prompts: Tensor, forwards: LayerForwards = EAGER) -> PromptCache:
    """prompts (B, P) long -> every layer's prompt keys and values. The last layer's MLPs are skipped:
    nothing reads the prompt rows' output."""
    num_prompt = prompts.shape[1]
    x = model.embed_tokens(prompts) * model.embed_scale  # (B, P, H)
    positions = torch.arange(num_prompt, device=prompts.device)
    ropes = {kind: _rope(model, kind, positions, x.dtype) for kind in model.rope_kinds}
    masks = {kind: attention_mask(num_prompt, 0, _window(model, kind), prompts.device) for kind in ropes}
    keys, values = [], []
    last = len(model.layers) - 1
    for i, (layer, spec) in enumerate(zip(model.layers, model.config.layers, strict=True)):
        if i == last:
            _, k, v = _project(layer.self_attn, layer.input_layernorm(x), ropes[spec.kind])
        else:
            x, k, v = forwards.prompt(layer, x, ropes[spec.kind], masks[spec.kind])
        keys.append(k)
        values.append(v)
    return PromptCache(keys, values)


def decode_canvases(
    model: DiffusionGemma,
    cache: PromptCache,
    canvases: Tensor,
    soft_embeds: Tensor | None = None,
    forwards: LayerForwards = EAGER,
) -> Tensor:
    """canvases (B * R, C) long, R per prompt in prompt order; soft_embeds (B * R, C, H) or None ->
    canvas hidden (B * R, C, H), final-normed like `DiffusionGemma.forward`'s decoder rows (feed it to
    `head_logits`)."""
    num_prompt, num_canvas = cache.num_prompt, canvases.shape[1]
    repeats = canvases.shape[0] // cache.keys[0].shape[0]
    embeds = model.embed_tokens(canvases) * model.embed_scale  # (B*R, C, H)
    x = model.self_conditioning(embeds, soft_embeds)
    positions = torch.arange(num_prompt, num_prompt + num_canvas, device=canvases.device)
    ropes = {kind: _rope(model, kind, positions, x.dtype) for kind in model.rope_kinds}
    masks = {  # the canvas rows: (C, P + C)
        kind: attention_mask(num_prompt, num_canvas, _window(model, kind), canvases.device)[num_prompt:]
        for kind in ropes
    }
    for layer, spec, k, v in zip(model.layers, model.config.layers, cache.keys, cache.values, strict=True):
        prompt_k, prompt_v = k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)
        x = forwards.canvas(layer, x, ropes[spec.kind], masks[spec.kind], prompt_k, prompt_v)
    return model.norm(x)


Encode = Callable[[DiffusionGemma, Tensor, LayerForwards], PromptCache]
Decode = Callable[[DiffusionGemma, PromptCache, Tensor, Tensor | None, LayerForwards], Tensor]


@dataclass(frozen=True)
class Passes:
    """The two passes a training step runs: `encode_prompts` and `decode_canvases`, or functions with
    their signatures that wrap them (the LoRA recipe runs each under its adapter side, `lora_adapter.py`)."""

    encode: Encode = encode_prompts
    decode: Decode = decode_canvases


DENSE = Passes()


def lm_head(model: DiffusionGemma) -> LMHead:
    """The tied head the engine's sampler uses."""
    return LMHead(model.embed_tokens.weight, model.config.final_logit_softcapping, model.embed_scale)


def head_logits(hidden: Tensor, head: LMHead) -> Tensor:
    """Softcapped fp32 logits, as `engine.sampler.logits_for` computes them but out of place (autograd)."""
    logits = F.linear(hidden, head.weight).float()
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits
