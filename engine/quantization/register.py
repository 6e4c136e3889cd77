"""The quantised formats plugged into the weight-method seam (`register_weight_format`).

- `compressed-tensors`, `modelopt`: stored checkpoints. The scheme is parsed from the checkpoint's
  `quantization_config` (`engine.quantization.parse`, `--quantization` checked against it), each
  linear and each layer's experts get the method of their stored format (plain when the scheme
  leaves them out), and the stream is remapped by `ExpertStacker`.
- `fp8`, `int8`: `--quantization` on a plain checkpoint; weights quantised as they are read
  (`engine.quantization.online`).

The kernel for a format is chosen here from the device and dtype (`choose_kernel`); every module
of one format shares one kernel instance.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from engine.kernels.dispatch import use_kernels
from engine.model.methods.base import ExpertsMethod, LinearMethod
from engine.model.methods.selection import (
    FormatContext,
    WeightFormatError,
    WeightMethods,
    register_weight_format,
)
from engine.quantization.expert_stream import ExpertStacker
from engine.quantization.methods import QuantExperts, QuantLinear
from engine.quantization.online import OnlineQuantizer
from engine.quantization.parse import COMPRESSED_TENSORS, MODELOPT, resolve_quantization
from engine.quantization.scheme import LinearFormat, QuantScheme, SchemeError, WeightFormat, checkpoint_module
from engine.quantization.weight_kernels import (
    Fp8ScaledMmKernel,
    Int4CpuKernel,
    Int8CpuKernel,
    Nvfp4TritonKernel,
    ReferenceKernel,
    W4A16TritonKernel,
    WeightKernel,
    scaled_mm_device,
)

_LINEAR = re.compile(r"(^|\.)(\w+_proj|proj)$")
ONLINE = ("fp8", "int8")


def is_linear_module(module: str) -> bool:
    """Engine module names of linears: `..._proj` (attention, MLPs) and `router.proj`."""
    return _LINEAR.search(module) is not None


def choose_kernel(fmt: LinearFormat, device: torch.device, dtype: torch.dtype) -> WeightKernel:
    """The fastest kernel for `fmt` on `device` that keeps the weights quantised (see weight_kernels)."""
    if device.type == "cpu" and not use_kernels(device):
        if fmt.weight == WeightFormat.INT8_CHANNEL:
            return Int8CpuKernel(fmt)
        if fmt.weight == WeightFormat.W4A16:
            return Int4CpuKernel(fmt, dtype)
        return ReferenceKernel(fmt)
    if fmt.weight == WeightFormat.FP8_CHANNEL and scaled_mm_device(device):
        return Fp8ScaledMmKernel(fmt)
    if use_kernels(device) and fmt.weight in (WeightFormat.NVFP4_CT, WeightFormat.NVFP4_MODELOPT):
        return Nvfp4TritonKernel(fmt)
    if use_kernels(device) and fmt.weight == WeightFormat.W4A16:
        return W4A16TritonKernel(fmt)
    return ReferenceKernel(fmt)


class _Chooser:
    """Module name -> method, one kernel per format, plain where the format function says None."""

    def __init__(self, plain: WeightMethods, context: FormatContext) -> None:
        self.plain, self.context = plain, context
        self.kernels: dict[LinearFormat, WeightKernel] = {}

    def kernel(self, fmt: LinearFormat) -> WeightKernel:
        if fmt not in self.kernels:
            self.kernels[fmt] = choose_kernel(fmt, self.context.device, self.context.dtype)
        return self.kernels[fmt]

    def linear(self, fmt_of: Callable[[str], LinearFormat | None]) -> Callable[[str], LinearMethod]:
        def choose(module: str) -> LinearMethod:
            fmt = fmt_of(module)
            return self.plain.plain_linear if fmt is None else QuantLinear(self.kernel(fmt), module)

        return choose

    def experts(self, fmt_of: Callable[[str], LinearFormat | None]) -> Callable[[str], ExpertsMethod]:
        def choose(module: str) -> ExpertsMethod:
            fmt = fmt_of(module)
            return self.plain.plain_experts if fmt is None else QuantExperts(self.kernel(fmt), module)

        return choose


def _scheme_linear(scheme: QuantScheme) -> Callable[[str], LinearFormat | None]:
    def fmt_of(module: str) -> LinearFormat | None:
        return scheme.format_for(checkpoint_module(module))

    return fmt_of


def _scheme_experts(scheme: QuantScheme, num_experts: int) -> Callable[[str], LinearFormat | None]:
    def fmt_of(module: str) -> LinearFormat | None:  # module: layers.N.experts
        return scheme.experts_format(checkpoint_module(module.removesuffix(".experts")), num_experts)

    return fmt_of


def build_stored(
    quantization_config: Mapping[str, Any], plain: WeightMethods, context: FormatContext
) -> WeightMethods:
    """A checkpoint stored quantised by compressed-tensors or ModelOpt."""
    if not context.from_checkpoint:
        raise WeightFormatError(
            f"--quantization {context.requested} needs a checkpoint stored in that format, but this "
            f"checkpoint is plain (no quantization_config); pass --quantization {' or '.join(ONLINE)} "
            "to quantise it at load, or convert it (python -m engine.quantization.convert)"
        )
    try:
        scheme = resolve_quantization({"quantization_config": quantization_config}, context.requested)
        assert scheme is not None
        config = context.config
        experts_of = _scheme_experts(scheme, config.num_experts)
        layers = {
            f"layers.{i}": fmt
            for i in range(len(config.layers))
            if (fmt := experts_of(f"layers.{i}.experts")) is not None
        }
    except SchemeError as err:
        raise WeightFormatError(str(err)) from err
    chooser = _Chooser(plain, context)
    linear_of = _scheme_linear(scheme)
    stacker = ExpertStacker(
        layers,
        config.num_experts,
        config.hidden_size,
        config.moe_intermediate_size,
        kv_cache_scales=scheme.kv_cache_scales,
    )
    return dataclasses.replace(
        plain,
        linear_choice=_guarded(chooser.linear(linear_of)),
        experts_choice=_guarded(chooser.experts(experts_of)),
        remap=stacker,
        format=scheme.quant_method,
    )


def build_online(
    quantization_config: Mapping[str, Any], plain: WeightMethods, context: FormatContext
) -> WeightMethods:
    """`--quantization fp8|int8` on a plain checkpoint."""
    kind = str(quantization_config.get("quant_method"))
    if context.from_checkpoint:
        raise WeightFormatError(
            f"quantization_config.quant_method {kind!r} (a serialized {kind} checkpoint) is not supported; "
            "canvas-serve loads compressed-tensors and modelopt checkpoints, or quantises a plain one "
            f"at load with --quantization {' or '.join(ONLINE)}"
        )
    try:
        scheme = resolve_quantization({}, kind)
    except SchemeError as err:
        raise WeightFormatError(str(err)) from err
    assert scheme is not None
    chooser = _Chooser(plain, context)
    linear_of = _scheme_linear(scheme)
    experts_of = _scheme_experts(scheme, context.config.num_experts)
    quantizer = OnlineQuantizer(linear_of, experts_of, is_linear_module)
    return dataclasses.replace(
        plain,
        linear_choice=chooser.linear(linear_of),
        experts_choice=chooser.experts(experts_of),
        remap=quantizer,
        format=kind,
    )


def _guarded(choose: Callable[[str], Any]) -> Callable[[str], Any]:
    """SchemeError from a per-module lookup -> WeightFormatError (reported by the loader)."""

    def guarded(module: str) -> Any:
        try:
            return choose(module)
        except SchemeError as err:
            raise WeightFormatError(str(err)) from err

    return guarded


def register() -> None:
    """Register every format above (idempotent)."""
    register_weight_format(COMPRESSED_TENSORS, build_stored)
    register_weight_format(MODELOPT, build_stored)
    register_weight_format("modelopt_fp4", build_stored)
    for kind in ONLINE:
        register_weight_format(kind, build_online)
