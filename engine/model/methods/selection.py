"""`WeightMethods`: which weight method each module gets, chosen once at load; and the format registry.

Built by `select_weight_methods(quantization_config, config, device, dtype, quantization)` from the
checkpoint's optional `quantization_config` (its `quant_method` names the format), the model
configuration, the device, the dtype and `--quantization` (vLLM's spelling: the checkpoint's own
method, or `fp8` / `int8` to quantise a plain checkpoint at load); the model constructor hands each
projection the method named for it (`linear_for("layers.3.self_attn.q_proj")`,
`experts_for("layers.3.experts")`). Module names are our parameter prefixes: the checkpoint's name
without `model.decoder.`.

A checkpoint format plugs in with `register_weight_format(quant_method, builder)`: the builder gets the
`quantization_config` mapping, the plain selection for the device and a `FormatContext` (model
configuration, device, dtype, the requested `--quantization`), and returns its own `WeightMethods`
(usually `dataclasses.replace(plain, linear=..., experts=..., ignore=..., remap=...)`). Modules it
leaves plain (its `ignore` list) get `plain_linear` / `plain_experts`; a format whose modules differ
in storage sets `linear_choice` / `experts_choice` (module name -> method) instead of one method.
A plain checkpoint with `--quantization fp8|int8` is served by the builder registered under that
name (its `quantization_config` argument is `{"quant_method": name}`). Its `remap` rewrites
the stream of (name, tensor) pairs the loader reads before they are assigned (e.g. stacking per-expert
2-D tensors into one expert tensor). Formats living in the `engine.quantization` package register
themselves when it is imported; `select_weight_methods` imports it (if present) before looking one up.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.config import ModelConfig
from engine.kernels.dispatch import use_kernels
from engine.kernels.grouped_experts import grouped_mm_fits
from engine.model.methods.base import ExpertsMethod, LinearMethod
from engine.model.methods.plain import GroupedExperts, LoopedExperts, UnquantizedLinear

TensorStream = Iterator[tuple[str, Tensor]]
"""(our parameter name, tensor) pairs, in the order the loader reads them."""

TensorRemap = Callable[[TensorStream], TensorStream]


class WeightFormatError(ValueError):
    """The checkpoint's weight format, or its tensors, cannot be served; the message names what and why.

    Raised by builders and remaps; the loader reports it as a `CheckpointError`."""


def keep_names(stream: TensorStream) -> TensorStream:
    """The identity remap: checkpoint tensors already carry the registered names."""
    return stream


@dataclass(frozen=True)
class WeightMethods:
    """The method of every module, by module name; `WeightMethods()` is all plain with looped experts.

    `ignore` lists modules left plain: an exact module name (`layers.0.router.proj`), a prefix ending in
    a dot (`layers.0.` for a whole layer), or `re:<pattern>` matched in full against the name.
    """

    linear: LinearMethod = field(default_factory=UnquantizedLinear)
    experts: ExpertsMethod = field(default_factory=LoopedExperts)
    plain_linear: LinearMethod = field(default_factory=UnquantizedLinear)
    plain_experts: ExpertsMethod = field(default_factory=LoopedExperts)
    ignore: tuple[str, ...] = ()
    remap: TensorRemap = keep_names
    format: str = "plain"
    linear_choice: Callable[[str], LinearMethod] | None = None
    experts_choice: Callable[[str], ExpertsMethod] | None = None

    def linear_for(self, module: str) -> LinearMethod:
        if self.ignores(module):
            return self.plain_linear
        return self.linear if self.linear_choice is None else self.linear_choice(module)

    def experts_for(self, module: str) -> ExpertsMethod:
        if self.ignores(module):
            return self.plain_experts
        return self.experts if self.experts_choice is None else self.experts_choice(module)

    def ignores(self, module: str) -> bool:
        return any(_matches(pattern, module) for pattern in self.ignore)


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern.removeprefix("re:"), module) is not None
    if pattern.endswith("."):
        return module.startswith(pattern)
    return module == pattern


@dataclass(frozen=True)
class FormatContext:
    """What a format builder may choose by: the model, where it runs, and what the user asked for."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    requested: str | None = None
    """`--quantization` as given (None: detect from the checkpoint)."""
    from_checkpoint: bool = True
    """False when the checkpoint is plain and `requested` alone named the builder."""


FormatBuilder = Callable[[Mapping[str, Any], WeightMethods, FormatContext], WeightMethods]
"""(quantization_config, the plain selection for the device, context) -> the format's selection."""

_FORMATS: dict[str, FormatBuilder] = {}


class UnsupportedWeightFormat(WeightFormatError):
    """The checkpoint's `quantization_config` names a format no registered builder serves."""


def register_weight_format(quant_method: str, builder: FormatBuilder) -> None:
    """Serve checkpoints whose `quantization_config.quant_method` is `quant_method` with `builder`."""
    if quant_method in _FORMATS and _FORMATS[quant_method] is not builder:
        raise ValueError(f"weight format {quant_method!r} is already registered")
    _FORMATS[quant_method] = builder


def registered_formats() -> list[str]:
    return sorted(_FORMATS)


def plain_experts_method(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> ExpertsMethod:
    """`GroupedExperts` where `grouped_mm` takes the dtype and the expert widths and is the faster path:
    where the kernels run on `device` (`engine.kernels.dispatch`), and for bf16 on the CPU (torch's
    fallback runs the experts' matmuls in one C++ call: 1.16-1.33x the Python loop a layer at one canvas;
    a CPU step of more than `CPU_GROUPED_MAX_ROWS` rows still loops; bench/RESULTS.md, "The CPU's bf16
    fast paths"). `LoopedExperts` (the reference) otherwise: fp32 on the CPU measured no faster grouped."""
    if not (use_kernels(device) or (device.type == "cpu" and dtype == torch.bfloat16)):
        return LoopedExperts()
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    x = torch.empty(0, hidden, dtype=dtype, device=device)
    gate_up = torch.empty(1, 2 * inter, hidden, dtype=dtype, device="meta")
    down = torch.empty(1, hidden, inter, dtype=dtype, device="meta")
    return GroupedExperts() if grouped_mm_fits(x, gate_up, down) else LoopedExperts()


def select_weight_methods(
    quantization_config: Mapping[str, Any] | None,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
) -> WeightMethods:
    """The selection for a checkpoint: plain unless `quantization_config` names a registered format
    or `quantization` (`--quantization`) asks to quantise a plain checkpoint at load."""
    experts = plain_experts_method(config, device, dtype)
    plain = WeightMethods(experts=experts, plain_experts=experts)
    if quantization_config is None and quantization is None:
        return plain
    _import_format_packages()
    context = FormatContext(config, device, dtype, quantization, quantization_config is not None)
    if quantization_config is None:
        quantization_config = {"quant_method": quantization}
        where = "--quantization"
    else:
        where = "quantization_config.quant_method"
    quant_method = quantization_config.get("quant_method")
    if quant_method not in _FORMATS:
        known = ", ".join(registered_formats()) or "none"
        raise UnsupportedWeightFormat(
            f"{where} {quant_method!r} is not supported (registered formats: {known})"
        )
    return _FORMATS[quant_method](quantization_config, plain, context)


FORMAT_PACKAGES = ("engine.quantization",)
"""Packages whose import registers weight formats (imported only when a checkpoint is quantized)."""


def _import_format_packages() -> None:
    for package in FORMAT_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            importlib.import_module(package)
