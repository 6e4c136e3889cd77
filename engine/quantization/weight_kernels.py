"""y = x @ W^T for one quantised weight, computed from its stored tensors: the reference and the fast paths.

A `WeightKernel` is what a quantised weight method calls (`engine.quantization.methods`): `prepare`
runs once after loading (a fast path may repack the stored tensors into its own layout; leading
expert dims pass through), `matmul` runs on every forward. Tensors are a mapping suffix -> tensor as
`engine.quantization.layout` names them (one linear, or one expert's slice of a stacked layer).

- `ReferenceKernel`: dequantise to x's dtype just before the matmul (`engine.quantization.reference`,
  the formats' exact math), then `F.linear`. Every format, every device.
- `Int8CpuKernel`: int8 per channel through `torch._weight_int8pack_mm` (where `int8_fits`).
- `Int4CpuKernel`: W4A16 repacked for `_weight_int4pack_mm_for_cpu` (where `int4_fits`, and only
  when the repacked bytes stay within `max_overhead` of the stored ones: its `scales_and_zeros`
  (K/g, N, 2) in the compute dtype is larger than the stored (N, K/g) scales).
- `Fp8ScaledMmKernel`: FP8 per channel through `torch._scaled_mm` with the activations quantised to
  FP8 per token at run time (Hopper and newer: compute capability 8.9+).
- `Nvfp4TritonKernel`, `W4A16TritonKernel`: the Triton dequantise-and-matmul kernels
  (`engine.kernels.nvfp4_matmul`, `w4a16_matmul`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.quantization.cpu_matmul import (
    Int4CpuWeight,
    int4_fits,
    int4_linear,
    int8_fits,
    int8_linear,
    pack_int4_for_cpu,
)
from engine.quantization.experts import row_global_scale
from engine.quantization.fp8 import FP8_DTYPE, FP8_MAX
from engine.quantization.int4_pack import unpack_int4
from engine.quantization.reference import dequantize
from engine.quantization.scheme import LinearFormat, WeightFormat

Tensors = Mapping[str, Tensor]


def input_width(fmt: LinearFormat, tensors: Tensors) -> int:
    """K, the weight's input width, read from its stored tensors."""
    if fmt.weight == WeightFormat.W4A16:
        assert fmt.group_size is not None, "W4A16 formats carry a group size"
        return int(tensors["weight_scale"].shape[-1]) * fmt.group_size
    if fmt.weight == WeightFormat.NVFP4_MODELOPT:
        return int(tensors["weight"].shape[-1]) * 2
    if fmt.weight == WeightFormat.NVFP4_CT:
        return int(tensors["weight_packed"].shape[-1]) * 2
    return int(tensors["weight"].shape[-1])


class WeightKernel(ABC):
    """y = x @ W^T for weights stored as `fmt`."""

    def __init__(self, fmt: LinearFormat) -> None:
        self.fmt = fmt

    def prepare(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors to keep after loading (default: the stored ones, unchanged)."""
        return tensors

    @abstractmethod
    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype."""


class ReferenceKernel(WeightKernel):
    """Dequantise (exact math, fp32 arithmetic, rounded once to x's dtype), then `F.linear`."""

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        return F.linear(x, dequantize(self.fmt, tensors, input_width(self.fmt, tensors), x.dtype))


class Int8CpuKernel(ReferenceKernel):
    """int8 per channel via `torch._weight_int8pack_mm`; the reference where it does not fit."""

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        weight = tensors["weight"]
        if x.device.type != "cpu" or not int8_fits(weight.shape[-1], x.dtype):
            return super().matmul(x, tensors)
        return int8_linear(x, weight, tensors["weight_scale"])


INT4_PACKED = "int4_packed"
INT4_SCALES_AND_ZEROS = "int4_scales_and_zeros"


class Int4CpuKernel(ReferenceKernel):
    """W4A16 repacked once for `_weight_int4pack_mm_for_cpu` (`dtype`: the activations' dtype).

    Repacks only where the kernel takes the shape and the repacked bytes are within `max_overhead`
    of the stored bytes; otherwise keeps the stored tensors and runs the reference.
    """

    def __init__(self, fmt: LinearFormat, dtype: torch.dtype, max_overhead: float = 0.05) -> None:
        super().__init__(fmt)
        assert fmt.group_size is not None, "W4A16 formats carry a group size"
        self.group_size, self.dtype, self.max_overhead = fmt.group_size, dtype, max_overhead

    def repack_overhead(self, scale_dtype: torch.dtype) -> float:
        """Repacked bytes / stored bytes - 1, per group of g weights (the packed codes cost the same)."""
        codes = self.group_size / 2
        stored = codes + torch.empty((), dtype=scale_dtype).element_size()
        repacked = codes + 2 * torch.empty((), dtype=self.dtype).element_size()
        return repacked / stored - 1

    def prepare(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        scale = tensors["weight_scale"]  # (..., N, G)
        rows, width = scale.shape[-2], scale.shape[-1] * self.group_size
        fits = int4_fits(rows, width, self.group_size, self.dtype) and scale.device.type == "cpu"
        if not fits or self.repack_overhead(scale.dtype) > self.max_overhead:
            return tensors
        lead = scale.shape[:-2]
        packed = tensors["weight_packed"].reshape(-1, *tensors["weight_packed"].shape[-2:])
        scales = scale.reshape(-1, *scale.shape[-2:])
        zeros = tensors.get("weight_zero_point")
        zeros = None if zeros is None else zeros.reshape(-1, *zeros.shape[-2:])
        parts = [
            pack_int4_for_cpu(
                unpack_int4(packed[i], width),
                scales[i],
                None if zeros is None else unpack_int4(zeros[i], rows, dim=0),
                self.group_size,
                self.dtype,
            )
            for i in range(packed.shape[0])
        ]
        return {
            INT4_PACKED: torch.stack([p.packed for p in parts]).reshape(*lead, *parts[0].packed.shape),
            INT4_SCALES_AND_ZEROS: torch.stack([p.scales_and_zeros for p in parts]).reshape(
                *lead, *parts[0].scales_and_zeros.shape
            ),
        }

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        if INT4_PACKED not in tensors:
            return super().matmul(x, tensors)
        scales_and_zeros = tensors[INT4_SCALES_AND_ZEROS]  # (G, N, 2)
        weight = Int4CpuWeight(
            tensors[INT4_PACKED], scales_and_zeros, self.group_size, scales_and_zeros.shape[1]
        )
        return int4_linear(x.to(self.dtype), weight).to(x.dtype)


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) activations -> FP8 E4M3 values and float32 scales (M, 1), one per token (row)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # (M, 1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_scaled_mm(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x (..., K) @ (fp8 weight (N, K) * weight_scale (N, 1))^T via `torch._scaled_mm`, x quantised to
    FP8 per token: y = (xq * sx) @ (wq * sw)^T, accumulated in fp32, returned in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    quantized, x_scale = quantize_per_token(flat)
    out = torch._scaled_mm(
        quantized,
        weight.t(),  # (K, N), column-major as _scaled_mm wants its second operand
        scale_a=x_scale,
        scale_b=weight_scale.float().reshape(1, -1),  # (1, N)
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def scaled_mm_device(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs FP8 with row-wise scales: CUDA capability 8.9 (Ada) / 9.0+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8ScaledMmKernel(ReferenceKernel):
    """FP8 weights x FP8 per-token activations through `torch._scaled_mm`; the reference for what it
    does not take (K and N must be multiples of 16; row-wise scales on CUDA need bf16 output)."""

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        weight = tensors["weight"]
        if weight.shape[-1] % 16 or weight.shape[-2] % 16 or x.dtype != torch.bfloat16:
            return super().matmul(x, tensors)
        return fp8_scaled_mm(x, weight, tensors["weight_scale"])


class Nvfp4TritonKernel(WeightKernel):
    """NVFP4 through the Triton dequantise-and-matmul kernel (either storage convention)."""

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        from engine.kernels.nvfp4_matmul import nvfp4_linear

        modelopt = self.fmt.weight == WeightFormat.NVFP4_MODELOPT
        packed = tensors["weight" if modelopt else "weight_packed"]
        global_scale = tensors["weight_scale_2" if modelopt else "weight_global_scale"]
        if global_scale.numel() > 1:  # an expert's [gate, up] scales: one per row
            global_scale = row_global_scale(global_scale, packed.shape[-2]).reshape(-1)
        return nvfp4_linear(x, packed, tensors["weight_scale"], global_scale, divide=not modelopt)


class W4A16TritonKernel(WeightKernel):
    """W4A16 through the Triton dequantise-and-matmul kernel."""

    def matmul(self, x: Tensor, tensors: Tensors) -> Tensor:
        from engine.kernels.w4a16_matmul import w4a16_linear

        width = input_width(self.fmt, tensors)
        return w4a16_linear(
            x, tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"), width
        )
