"""The checkpoint tensors each stored format implies for one linear: names, shapes, dtypes.

What a weight method's `create_weights` registers and what the loader must find (every one, and
nothing else) for a quantised linear of `out_features` x `in_features`; the converter writes exactly
these. Scales keep the checkpoint's float dtype (`dtypes` lists the accepted ones, the first being
what the converter writes for a bf16 model), so resident bytes match the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quantization.fp8 import FP8_DTYPE
from engine.quantization.int4_pack import packed_width
from engine.quantization.nvfp4 import NVFP4_GROUP
from engine.quantization.scheme import LinearFormat, WeightFormat

FLOAT_SCALES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its shape and the dtypes a checkpoint may store it in."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]

    def accepts(self, tensor: torch.Tensor) -> bool:
        """True when `tensor` has this spec's shape and one of its dtypes; a scalar spec (shape ())
        also takes a (1,) tensor, as some ModelOpt exports store `weight_scale_2`."""
        scalar_ok = self.shape == () and tuple(tensor.shape) == (1,)
        return (tuple(tensor.shape) == self.shape or scalar_ok) and tensor.dtype in self.dtypes


def linear_tensors(fmt: LinearFormat, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """Name suffix (after `<module>.`) -> spec, for one linear stored as `fmt`."""
    n, k = out_features, in_features
    if fmt.weight == WeightFormat.FP8_CHANNEL:
        return {"weight": TensorSpec((n, k), (FP8_DTYPE,)), "weight_scale": TensorSpec((n, 1), FLOAT_SCALES)}
    if fmt.weight == WeightFormat.W4A16:
        assert fmt.group_size is not None, "W4A16 formats carry a group size"
        groups = k // fmt.group_size
        specs = {
            "weight_packed": TensorSpec((n, packed_width(k)), (torch.int32,)),
            "weight_scale": TensorSpec((n, groups), FLOAT_SCALES),
            "weight_shape": TensorSpec((2,), (torch.int64, torch.int32)),
        }
        if not fmt.symmetric:
            specs["weight_zero_point"] = TensorSpec((packed_width(n), groups), (torch.int32,))
        return specs
    blocks = TensorSpec((n, k // NVFP4_GROUP), (FP8_DTYPE,))
    packed = TensorSpec((n, k // 2), (torch.uint8,))
    if fmt.weight == WeightFormat.NVFP4_CT:
        return {
            "weight_packed": packed,
            "weight_scale": blocks,
            "weight_global_scale": TensorSpec((1,), (torch.float32,)),
        }
    if fmt.weight == WeightFormat.NVFP4_MODELOPT:
        scalar = TensorSpec((), (torch.float32,))
        return {"weight": packed, "weight_scale": blocks, "weight_scale_2": scalar, "input_scale": scalar}
    raise ValueError(f"{fmt.weight.value} weights are quantised at load and never stored")


def optional_tensors(fmt: LinearFormat) -> frozenset[str]:
    """Suffixes a checkpoint may store for `fmt` beyond `linear_tensors` (W4A4 activation scales)."""
    if fmt.weight == WeightFormat.NVFP4_CT:
        return frozenset({"input_global_scale"})
    return frozenset()
