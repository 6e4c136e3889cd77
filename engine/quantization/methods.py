"""The quantised weight methods: one linear, or a layer's stacked experts, stored as a `LinearFormat`.

Both register exactly the tensors the format stores (`engine.quantization.layout`; for experts
stacked as `engine.quantization.experts` describes, under `gate_up_<suffix>` and `down_<suffix>`),
keep them in their stored dtypes (resident bytes = checkpoint bytes), hand them to a `WeightKernel`
once after loading and on every forward (`engine.quantization.weight_kernels`). The experts run one
expert at a time, only those that received tokens, so a reference kernel dequantises only them.

Formats quantised at load (`--quantization int8|fp8`) store `weight` and `weight_scale`:
int8 (N, K) with float32 (N,) scales; FP8 (N, K) with float32 (N, 1) scales.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from engine.model.methods.base import ExpertsMethod, LinearMethod
from engine.model.methods.plain import gelu_tanh, route_experts
from engine.model.methods.selection import WeightFormatError
from engine.quantization.experts import SCALARS
from engine.quantization.layout import TensorSpec, linear_tensors
from engine.quantization.scheme import LinearFormat, WeightFormat
from engine.quantization.w4a16 import check_group_size
from engine.quantization.weight_kernels import WeightKernel

EXPERT_PARTS = ("gate_up", "down")


def stored_specs(fmt: LinearFormat, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """Suffix -> spec of every tensor a linear stored as `fmt` keeps (stored or quantised at load)."""
    if fmt.weight == WeightFormat.INT8_CHANNEL:
        return {
            "weight": TensorSpec((out_features, in_features), (torch.int8,)),
            "weight_scale": TensorSpec((out_features,), (torch.float32,)),
        }
    return linear_tensors(fmt, out_features, in_features)


def expert_specs(fmt: LinearFormat, num_experts: int, hidden: int, inter: int) -> dict[str, TensorSpec]:
    """`gate_up_<suffix>` / `down_<suffix>` -> the stacked spec: gate_up (E, 2I, H) rows gate then up,
    down (E, H, I); per-projection scalars (E, 2) and (E, 1); packed zero points need I % 8 == 0."""
    if fmt.weight == WeightFormat.W4A16 and not fmt.symmetric and inter % 8:
        raise WeightFormatError(
            f"asymmetric W4A16 experts need an expert width divisible by 8 (zero points are packed "
            f"eight rows a word); this model's is {inter}"
        )
    specs: dict[str, TensorSpec] = {}
    for part, (rows, width, parts) in zip(
        EXPERT_PARTS, ((2 * inter, hidden, 2), (hidden, inter, 1)), strict=True
    ):
        for suffix, spec in stored_specs(fmt, rows, width).items():
            shape = (parts,) if suffix in SCALARS else spec.shape
            specs[f"{part}_{suffix}"] = TensorSpec((num_experts, *shape), spec.dtypes)
    return specs


def check_width(fmt: LinearFormat, width: int, module: str) -> None:
    """WeightFormatError naming `module` when the format's group size does not divide its input width."""
    if fmt.group_size is not None:
        try:
            check_group_size(width, fmt.group_size, module)
        except ValueError as err:
            raise WeightFormatError(str(err)) from err


def _register(layer: nn.Module, specs: Mapping[str, TensorSpec]) -> None:
    for name, spec in specs.items():
        layer.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtypes[0]))


def _check_dtypes(layer: nn.Module, specs: Mapping[str, TensorSpec], module: str) -> None:
    for name, spec in specs.items():
        tensor = layer.get_buffer(name)
        if tensor.dtype not in spec.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
            raise WeightFormatError(
                f"{module}.{name} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                f"its format stores it as {allowed}"
            )


def _replace_buffers(layer: nn.Module, old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> None:
    for name in old:
        delattr(layer, name)
    for name, tensor in new.items():
        layer.register_buffer(name, tensor)


def _specs_of(layer: nn.Module) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = layer.__dict__["quant_specs"]
    return specs


def _names_of(layer: nn.Module) -> tuple[str, ...]:
    names: tuple[str, ...] = layer.__dict__["quant_names"]
    return names


def _prepare(layer: nn.Module, kernel: WeightKernel, prefix: str) -> list[str]:
    """Hand the stored tensors named `prefix<suffix>` to `kernel.prepare`; keep what it returns."""
    stored = {n.removeprefix(prefix): layer.get_buffer(n) for n in _names_of(layer) if n.startswith(prefix)}
    prepared = kernel.prepare(stored)
    if prepared is not stored:
        _replace_buffers(
            layer, {prefix + n: t for n, t in stored.items()}, {prefix + n: t for n, t in prepared.items()}
        )
    return [prefix + n for n in prepared]


class QuantLinear(LinearMethod):
    """One quantised linear `module` (engine name, for messages) through `kernel`."""

    def __init__(self, kernel: WeightKernel, module: str) -> None:
        self.kernel, self.fmt, self.module = kernel, kernel.fmt, module

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        check_width(self.fmt, in_features, self.module)
        specs = stored_specs(self.fmt, out_features, in_features)
        _register(layer, specs)
        layer.__dict__["quant_specs"] = specs
        layer.__dict__["quant_names"] = tuple(specs)

    def keeps_stored_dtype(self, name: str) -> bool:
        return True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _check_dtypes(layer, _specs_of(layer), self.module)
        layer.__dict__["quant_names"] = tuple(_prepare(layer, self.kernel, ""))

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        return self.kernel.matmul(x, {name: layer.get_buffer(name) for name in _names_of(layer)})


class QuantExperts(ExpertsMethod):
    """A layer's experts (`module`: engine name, for messages) stacked and stored as `fmt`, each
    projection through `kernel`; only experts that received tokens are computed."""

    def __init__(self, kernel: WeightKernel, module: str) -> None:
        self.kernel, self.fmt, self.module = kernel, kernel.fmt, module

    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, inter: int) -> None:
        check_width(self.fmt, hidden, f"{self.module}.*.gate_proj")
        check_width(self.fmt, inter, f"{self.module}.*.down_proj")
        specs = expert_specs(self.fmt, num_experts, hidden, inter)
        _register(layer, specs)
        layer.__dict__["quant_specs"] = specs
        layer.__dict__["quant_names"] = tuple(specs)

    def keeps_stored_dtype(self, name: str) -> bool:
        return True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _check_dtypes(layer, _specs_of(layer), self.module)
        kept = [name for part in EXPERT_PARTS for name in _prepare(layer, self.kernel, f"{part}_")]
        layer.__dict__["quant_names"] = tuple(kept)

    def _part(self, layer: nn.Module, part: str) -> dict[str, Tensor]:
        prefix = f"{part}_"
        return {n.removeprefix(prefix): layer.get_buffer(n) for n in _names_of(layer) if n.startswith(prefix)}

    def apply(self, layer: nn.Module, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
        gate_up, down = self._part(layer, "gate_up"), self._part(layer, "down")

        def expert(rows_x: Tensor, index: int) -> Tensor:
            h = self.kernel.matmul(rows_x, {n: t[index] for n, t in gate_up.items()})  # (c, 2I)
            gate, up = h.chunk(2, dim=-1)
            return self.kernel.matmul(gelu_tanh(gate) * up, {n: t[index] for n, t in down.items()})

        num_experts = next(iter(gate_up.values())).shape[0]
        return route_experts(x, weights, expert_ids, num_experts, expert)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (what the weights cost in memory)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
