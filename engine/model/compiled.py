"""`compile_layers`: the layer stack through `torch.compile`, for small models whose step is per-op cost.

On the CPU a small model's denoise step is mostly the dispatch of many small ops (norms, RoPE, GELU,
casts, residual adds: bench/PROFILE.md); inductor fuses each layer's elementwise work between the
matmuls into a few loops. What stays eager, behind `torch._dynamo.disable`:
- the attention backend call: it reads per-step Python metadata (the bound plans) and the paged cache;
- the MoE when its experts loop: the loop over experts has a host sync and data-dependent shapes.
  Grouped experts have neither: on the CPU (bf16) they compile into the layer's graph, two grouped
  matmuls over the sorted rows with the GELU, the weighting and the gather back fused around them
  (CUDA keeps them eager until a GPU has tested them compiled). With few experts (at most
  `DENSE_EXPERTS_RATIO` times top-k) experts that would stay eager (looped ones; grouped ones on CUDA)
  switch to `DenseExperts`, every expert on every token, which compiles into the layer.

Shapes are dynamic (one graph per kind of layer, whatever the step's token count). The first steps pay
the compilation (seconds to a minute on a small CPU; inductor needs a C++ compiler on the CPU).
The result equals the eager forward up to floating-point rounding (tests/engine/test_compiled.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from engine.attention.base import BoundAttention
from engine.attention.types import LayerCache
from engine.model.diffusion_gemma import DiffusionGemma, Layer, Rope
from engine.model.methods.plain import DenseExperts, GroupedExperts, LoopedExperts

DENSE_EXPERTS_RATIO = 2
"""Plain experts that would stay out of the compiled graph run dense when num_experts <= this * top_k
(4 experts, top-2: twice the loop's expert arithmetic)."""


def compile_layers(model: DiffusionGemma) -> None:
    """Run every layer of `model` through one compiled forward (in place; idempotent)."""
    few = model.config.num_experts <= DENSE_EXPERTS_RATIO * model.config.top_k_experts
    device = model.embed_tokens.weight.device
    for layer in model.layers:
        assert isinstance(layer, Layer)
        method = layer.experts.method
        if few and type(method) in (LoopedExperts, GroupedExperts) and not _in_graph(method, device):
            layer.experts.method = DenseExperts()
        layer.forward = functools.partial(_compiled_forward, layer)  # type: ignore[method-assign]


def _before_attention(layer: Layer, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
    """The layer up to its attention: input norm, q/k/v projections, their norms and RoPE."""
    q, k, v = layer.self_attn.project(layer.input_layernorm(x), rope)
    return q, k, v


def _after_attention(layer: Layer, x: Tensor, out: Tensor, is_decoder: Tensor) -> Tensor:
    """The layer after its attention: o_proj, residual, dense MLP beside the MoE, the mode's scalar
    (a looped MoE stays out of the graph; grouped and dense ones compile into it)."""
    moe: Callable[[Tensor], Tensor] = layer.moe
    if not _in_graph(layer.experts.method, x.device):
        moe = torch._dynamo.disable(moe)  # type: ignore[no-untyped-call]
    return layer.feed_forward(x, layer.self_attn.output(out), moe) * layer.mode_scalar(is_decoder)


def _in_graph(method: object, device: torch.device) -> bool:
    """Dense experts compile into the layer anywhere, grouped ones on the CPU (CUDA's grouped GEMM
    under compilation waits for a GPU to test it on: issue 25); looped and wrapped (LoRA, quantized)
    experts stay eager. Few plain experts that would stay eager run dense instead (`compile_layers`);
    grouped ones on the CPU stay grouped, with half the dense experts' arithmetic at top-2 of 4: the
    shipped Sudoku model's compiled step, 16 canvases, one thread, AMD EPYC, 86 ms grouped against 95
    dense (bench/RESULTS.md, "Compiled Sudoku step: grouped experts")."""
    return isinstance(method, DenseExperts) or (isinstance(method, GroupedExperts) and device.type == "cpu")


_compiled_before = torch.compile(_before_attention, dynamic=True)
_compiled_after = torch.compile(_after_attention, dynamic=True)


def _compiled_forward(
    layer: Layer, x: Tensor, rope: Rope, is_decoder: Tensor, attention: BoundAttention[Any], cache: LayerCache
) -> Tensor:
    """`Layer.forward` as two compiled graphs around the eager attention call: two graph calls (and
    two guard checks) a layer, where compiling the whole forward with the attention call disabled inside
    it broke into five frames of its own."""
    q, k, v = _compiled_before(layer, x, rope)
    return _compiled_after(layer, x, attention(q, k, v, cache), is_decoder)
