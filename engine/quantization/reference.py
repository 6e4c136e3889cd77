"""The reference weight math: any stored format -> its float weight, for dequantise-then-matmul.

`dequantize(fmt, tensors, width, dtype)` takes one linear's stored tensors (suffix -> tensor, as
`engine.quantization.layout` names them) or a layer's stacked experts (`engine.quantization.experts`)
and returns the (..., N, K) weight in `dtype`, with each format's exact math computed in fp32. A
reference weight method is then `F.linear(x, dequantize(...))`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from engine.quantization.experts import row_global_scale
from engine.quantization.fp8 import dequantize_fp8_channel
from engine.quantization.int8 import dequantize_int8_channel
from engine.quantization.nvfp4 import dequantize_nvfp4_ct, dequantize_nvfp4_modelopt
from engine.quantization.scheme import LinearFormat, WeightFormat
from engine.quantization.w4a16 import dequantize_w4a16


def dequantize(fmt: LinearFormat, tensors: Mapping[str, Tensor], width: int, dtype: torch.dtype) -> Tensor:
    """Stored tensors -> the (..., N, K = width) weight in `dtype`."""
    if fmt.weight == WeightFormat.FP8_CHANNEL:
        return dequantize_fp8_channel(tensors["weight"], tensors["weight_scale"], dtype)
    if fmt.weight == WeightFormat.INT8_CHANNEL:
        return dequantize_int8_channel(tensors["weight"], tensors["weight_scale"], dtype)
    if fmt.weight == WeightFormat.W4A16:
        zero = tensors.get("weight_zero_point")
        return dequantize_w4a16(tensors["weight_packed"], tensors["weight_scale"], zero, width, dtype)
    if fmt.weight == WeightFormat.NVFP4_MODELOPT:
        packed = tensors["weight"]
        global_scale = row_global_scale(tensors["weight_scale_2"], packed.shape[-2])
        return dequantize_nvfp4_modelopt(packed, tensors["weight_scale"], global_scale, dtype)
    packed = tensors["weight_packed"]
    global_scale = row_global_scale(tensors["weight_global_scale"], packed.shape[-2])
    return dequantize_nvfp4_ct(packed, tensors["weight_scale"], global_scale, dtype)
