"""`--quantization int8|fp8` on a plain checkpoint: the loader's remap quantises each weight as it is read.

Each float weight of a quantised linear (`<module>.weight` (N, K)) becomes `weight` + `weight_scale`
(per output channel, `engine.quantization.int8` / `fp8`, scales in float32); the fused experts
(`layers.N.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)) become `gate_up_weight`,
`gate_up_weight_scale`, ... per expert row, the stacked layout `engine.quantization.methods`
registers. One tensor is quantised at a time, so a float copy of the model never exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.model.methods.selection import TensorStream
from engine.quantization.fp8 import quantize_fp8_channel
from engine.quantization.int8 import quantize_int8_channel
from engine.quantization.scheme import LinearFormat, WeightFormat

_FUSED = ("gate_up_proj", "down_proj")


def quantize_rows(weight: Tensor, fmt: LinearFormat) -> dict[str, Tensor]:
    """(..., N, K) float weight -> `weight` and `weight_scale`, one scale per row (leading dims kept)."""
    rows = weight.reshape(-1, weight.shape[-1]).float()  # (R, K)
    lead = weight.shape[:-1]
    if fmt.weight == WeightFormat.INT8_CHANNEL:
        int8 = quantize_int8_channel(rows)
        return {"weight": int8.weight.reshape(weight.shape), "weight_scale": int8.weight_scale.reshape(lead)}
    if fmt.weight == WeightFormat.FP8_CHANNEL:
        fp8 = quantize_fp8_channel(rows, torch.float32)
        return {
            "weight": fp8.weight.reshape(weight.shape),
            "weight_scale": fp8.weight_scale.reshape(*lead, 1),
        }
    raise ValueError(f"{fmt.weight.value} weights are not quantised at load")


@dataclass(frozen=True)
class OnlineQuantizer:
    """A `TensorRemap`. `linear_format(module)` / `experts_format(module)`: the format of an engine
    module (`layers.3.mlp.up_proj`, `layers.3.experts`), None when it stays plain."""

    linear_format: Callable[[str], LinearFormat | None]
    experts_format: Callable[[str], LinearFormat | None]
    is_linear: Callable[[str], bool]

    def __call__(self, stream: TensorStream) -> TensorStream:
        for name, tensor in stream:
            module, _, leaf = name.rpartition(".")
            if module.endswith(".experts") and leaf in _FUSED:
                fmt = self.experts_format(module)
                if fmt is not None:
                    part = leaf.removesuffix("_proj")
                    for suffix, stored in quantize_rows(tensor, fmt).items():
                        yield f"{module}.{part}_{suffix}", stored
                    continue
            elif leaf == "weight" and tensor.ndim == 2 and self.is_linear(module):
                fmt = self.linear_format(module)
                if fmt is not None:
                    for suffix, stored in quantize_rows(tensor, fmt).items():
                        yield f"{module}.{suffix}", stored
                    continue
            yield name, tensor
