"""The weight-method interfaces: a layer owns its parameters, its method creates, prepares and applies them.

A method is chosen once at load (`engine.model.methods.selection`) and held by the module
(`engine.model.layers.Linear`, `Experts`), whose `forward` is one call to `method.apply`. Adding a
weight format (FP8, NVFP4, int8, ...) adds method classes, never a branch in a layer.

Life cycle, driven by the model constructor and `engine.model.loader`:
1. `create_weights(layer, ...)` registers on `layer` the parameters/buffers the checkpoint stores for
   it, under the checkpoint's names (relative to the layer, e.g. `weight`, `weight_scale`). It runs on
   whatever device the model is built on (the loader builds on the meta device).
2. The loader casts each checkpoint tensor to `load_dtype(name, model_dtype)` (or keeps its stored
   dtype where `keeps_stored_dtype(name)`) and assigns it by name.
3. `process_weights_after_loading(layer)` runs once after every tensor is assigned (repack into a
   kernel's layout, fold scales, ...). Default: nothing.
4. `apply(layer, ...)` computes the module's output on every forward.
Methods hold no tensors and no per-layer state: one instance may serve many layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class WeightMethod:
    """What every method shares: the post-load hook and the dtype each stored tensor loads in."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack once after every tensor is assigned (e.g. into a kernel's layout). Default: nothing."""
        return None

    def load_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the loader casts the checkpoint tensor `name` (relative to the layer) to.

        Plain methods: the model's dtype. A quantized method keeps its packed weights and scales in
        their stored dtypes (e.g. float8_e4m3fn weights, float32 scales).
        """
        return model_dtype

    def keeps_stored_dtype(self, name: str) -> bool:
        """True when the checkpoint tensor `name` loads in whatever dtype it is stored in (e.g. a
        quantised format's scales, which checkpoints store in bf16, fp16 or fp32). Default: False."""
        return False


class LinearMethod(WeightMethod, ABC):
    """`y = x @ W.T` for one projection without bias: x (..., in) -> (..., out)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        """Register the parameters/buffers the checkpoint stores for this linear, under the checkpoint's
        names (plain: `weight` (out, in); a quantized method e.g. `weight`, `weight_scale`)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x's dtype."""


class ExpertsMethod(WeightMethod, ABC):
    """The MoE experts: each token's k experts `down(gelu_tanh(gate(x)) * up(x))`, weighted and summed."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, inter: int) -> None:
        """Register the experts' stored tensors (plain: `gate_up_proj` (E, 2I, H) with the gate rows
        first, `down_proj` (E, H, I))."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        """x (T, H), weights (T, k) fp32, expert_ids (T, k) -> (T, H) in x's dtype."""


def stored(layer: nn.Module, name: str) -> Tensor:
    """The tensor a method registered on `layer` as `name` (typed for the methods' `apply`)."""
    tensor = getattr(layer, name)
    assert isinstance(tensor, Tensor), f"{type(layer).__name__}.{name} is not a tensor"
    return tensor
