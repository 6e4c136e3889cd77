"""The loader's tensor-stream remap for stored quantised checkpoints: per-expert tensors -> stacked.

The published checkpoints store each expert's projections as 2-D modules
(`layers.N.experts.E.{gate,up,down}_proj.<suffix>`, our names); `QuantExperts` keeps them stacked
(`layers.N.experts.gate_up_<suffix>` (E, 2I, ...), `down_<suffix>` (E, H, ...), the layout of
`engine.quantization.experts`). `ExpertStacker` copies each arriving tensor into its slot of the
stacked tensor (allocated once, on the first piece) and yields the stacked tensor when its last
piece has arrived, so at most the stacked tensors of the layers being read exist besides the
model. Every tensor the format implies must come exactly once: a missing, unexpected, duplicated or
mis-shaped expert tensor is a `WeightFormatError` naming it (in the checkpoint's spelling).

Also dropped here, having been read: optional tensors a weight-only path does not use
(`input_global_scale`), and KV-cache scales (`k_scale`, `v_scale`) when the scheme stores them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.model.methods.selection import TensorStream, WeightFormatError
from engine.quantization.experts import PROJECTIONS, SCALARS
from engine.quantization.int4_pack import packed_width
from engine.quantization.layout import TensorSpec, linear_tensors, optional_tensors
from engine.quantization.scheme import LinearFormat

_EXPERT = re.compile(r"^(layers\.\d+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_KV_SCALES = frozenset({"k_scale", "v_scale"})
_DROPPED_LINEAR_SUFFIXES = frozenset({"input_global_scale"})


def checkpoint_name(name: str) -> str:
    return "model.decoder." + name


@dataclass
class _Slot:
    """One stacked tensor being filled: the pieces still to come."""

    tensor: Tensor
    remaining: int


@dataclass
class ExpertStacker:
    """A `TensorRemap`: `layers` maps each layer prefix (`layers.3`) whose experts are quantised to its
    format; `num_experts`, `hidden`, `inter` are the model's."""

    layers: Mapping[str, LinearFormat]
    num_experts: int
    hidden: int
    inter: int
    kv_cache_scales: bool = False
    quantised_linears: frozenset[str] = frozenset()
    """Engine module names of quantised linears (their optional tensors are read and dropped)."""
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _seen: set[tuple[str, int, str, str]] = field(default_factory=set)

    def __call__(self, stream: TensorStream) -> TensorStream:
        for name, tensor in stream:
            module, _, suffix = name.rpartition(".")
            if self.kv_cache_scales and suffix in _KV_SCALES:
                continue
            if suffix in _DROPPED_LINEAR_SUFFIXES and module in self.quantised_linears:
                continue
            match = _EXPERT.match(name)
            if match is None:
                yield name, tensor
                continue
            layer, expert, projection, suffix = match[1], int(match[2]), match[3], match[4]
            done = self._place(name, layer, expert, projection, suffix, tensor)
            if done is not None:
                yield done
        self._check_complete()

    def _specs(self, fmt: LinearFormat, projection: str) -> dict[str, TensorSpec]:
        rows, width = (self.hidden, self.inter) if projection == "down_proj" else (self.inter, self.hidden)
        return linear_tensors(fmt, rows, width)

    def _place(
        self, name: str, layer: str, expert: int, projection: str, suffix: str, tensor: Tensor
    ) -> tuple[str, Tensor] | None:
        fmt = self.layers.get(layer)
        if fmt is None:
            raise WeightFormatError(
                f"checkpoint tensor {checkpoint_name(name)} is not used: the experts of "
                f"{checkpoint_name(layer)} are not quantised by this checkpoint's quantization_config"
            )
        if expert >= self.num_experts:
            raise WeightFormatError(
                f"checkpoint tensor {checkpoint_name(name)} is not used: the model has "
                f"{self.num_experts} experts per layer"
            )
        if suffix in optional_tensors(fmt):
            return None
        specs = self._specs(fmt, projection)
        if suffix not in specs:
            raise WeightFormatError(
                f"checkpoint tensor {checkpoint_name(name)} is not used: a {fmt.weight.value} expert "
                f"projection stores {', '.join(sorted(specs))}"
            )
        spec = specs[suffix]
        if not spec.accepts(tensor):
            raise WeightFormatError(
                f"checkpoint tensor {checkpoint_name(name)} is {tuple(tensor.shape)} {tensor.dtype}; "
                f"the {fmt.weight.value} format stores {spec.shape} in {spec.dtypes}"
            )
        key = (layer, expert, projection, suffix)
        if key in self._seen:
            raise WeightFormatError(f"checkpoint tensor {checkpoint_name(name)} is stored twice")
        self._seen.add(key)
        part = "down" if projection == "down_proj" else "gate_up"
        target = f"{layer}.experts.{part}_{suffix}"
        slot = self._slot(target, part, suffix, spec, tensor)
        _copy_piece(slot.tensor[expert], projection, suffix, tensor, self.inter)
        slot.remaining -= 1
        if slot.remaining:
            return None
        del self._slots[target]
        return target, slot.tensor

    def _slot(self, target: str, part: str, suffix: str, spec: TensorSpec, first: Tensor) -> _Slot:
        if target not in self._slots:
            pieces = 1 if part == "down" else 2
            shape = (pieces,) if suffix in SCALARS else _stacked_piece_shape(part, suffix, spec, self.inter)
            stacked = torch.empty((self.num_experts, *shape), dtype=first.dtype)
            self._slots[target] = _Slot(stacked, self.num_experts * pieces)
        slot = self._slots[target]
        if first.dtype != slot.tensor.dtype:
            raise WeightFormatError(
                f"{checkpoint_name(target)}: expert tensors are stored in both {slot.tensor.dtype} "
                f"and {first.dtype}; one dtype per layer and suffix"
            )
        return slot

    def _check_complete(self) -> None:
        for layer, fmt in sorted(self.layers.items()):
            for projection in PROJECTIONS:
                for suffix in self._specs(fmt, projection):
                    for expert in range(self.num_experts):
                        if (layer, expert, projection, suffix) not in self._seen:
                            missing = f"{layer}.experts.{expert}.{projection}.{suffix}"
                            raise WeightFormatError(
                                f"checkpoint is missing tensor {checkpoint_name(missing)}"
                            )


def _stacked_piece_shape(part: str, suffix: str, spec: TensorSpec, inter: int) -> tuple[int, ...]:
    """One expert's stacked shape for a suffix: gate_up doubles the rows (or the packed rows)."""
    if part == "down":
        return spec.shape
    if suffix == "weight_shape":
        return spec.shape
    if suffix == "weight_zero_point":
        return (2 * packed_width(inter), *spec.shape[1:])
    return (2 * spec.shape[0], *spec.shape[1:])


def _copy_piece(slot: Tensor, projection: str, suffix: str, tensor: Tensor, inter: int) -> None:
    """Copy one expert projection's tensor into its expert's slot of the stacked tensor."""
    if suffix in SCALARS:
        slot[0 if projection != "up_proj" else 1] = tensor.reshape(())
    elif projection == "down_proj":
        slot.copy_(tensor)
    elif suffix == "weight_shape":
        slot.copy_(torch.stack([tensor[0] * 2, tensor[1]]))
    else:
        half = packed_width(inter) if suffix == "weight_zero_point" else tensor.shape[0]
        (slot[:half] if projection == "gate_proj" else slot[half:]).copy_(tensor)
