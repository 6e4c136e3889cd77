"""A quantised checkpoint's scheme: which linear modules are quantised, and in which stored format.

Built once at load from the checkpoint's `quantization_config` (`engine.quantization.parse`) or from
`--quantization fp8|int8` for a plain checkpoint (`online_scheme`), then asked per module:
`scheme.format_for("model.decoder.layers.3.self_attn.q_proj")` -> a `LinearFormat`, or None when the
module stays plain. Module names are the checkpoint's (an engine name `layers.3.mlp.up_proj` is
`checkpoint_module("layers.3.mlp.up_proj")`); experts are asked per expert and projection
(`model.decoder.layers.3.experts.7.down_proj`), as the published checkpoints store them, and
`experts_format` checks that a layer's experts agree.

Matching, as the producers define it:
- compressed-tensors (`utils/match.py` `match_name`, `_match_class`; compressed-tensors 0.20.1): a
  target or ignore entry is an exact module name, `re:<pattern>` matched with `re.match` (anchored at
  the start only), or a module class name; `Linear` is the only class canvas-serve quantises and
  every name this scheme is asked about is a linear, so `Linear` matches all. When several groups
  target a module the most specific wins (exact name, then regex, then class), as in `match_targets`.
- ModelOpt (vLLM `modelopt.py` `is_layer_excluded`): every linear is quantised unless an `ignore`
  (`exclude_modules`) entry equals its name or matches it as an `fnmatch` wildcard (`*mlp*`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from engine.quantization.w4a16 import check_group_size

DECODER_PREFIX = "model.decoder."
LINEAR_CLASS = "Linear"
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SchemeError(ValueError):
    """The quantization config (or `--quantization`) cannot be served; the message names what and why."""


class WeightFormat(StrEnum):
    """How a quantised linear's weight is stored (the tensors each implies: `engine.quantization.layout`)."""

    FP8_CHANNEL = "fp8-channel"
    """compressed-tensors `float-quantized`: FP8 E4M3 weight, one scale per output channel."""
    INT8_CHANNEL = "int8-channel"
    """`--quantization int8` at load: int8 weight, one scale per output channel (never stored)."""
    W4A16 = "w4a16"
    """compressed-tensors `pack-quantized`: int4 groups packed in int32, optional zero points."""
    NVFP4_CT = "nvfp4-ct"
    """compressed-tensors `nvfp4-pack-quantized`: e2m1 + FP8 block scales, divisor global scale."""
    NVFP4_MODELOPT = "nvfp4-modelopt"
    """ModelOpt NVFP4: e2m1 + FP8 block scales, multiplier `weight_scale_2`, `input_scale`."""


class ActivationQuant(StrEnum):
    """What the checkpoint says about input activations (the reference path keeps them unquantised)."""

    NONE = "none"
    FP8_DYNAMIC_TOKEN = "fp8-dynamic-token"
    """FP8 per token, computed at run time: what `torch._scaled_mm` takes on Hopper."""
    NVFP4 = "nvfp4"
    """W4A4 checkpoints: FP4 activations need Blackwell; elsewhere served as W4A16."""


@dataclass(frozen=True)
class LinearFormat:
    """One quantised linear's storage. `group_size`: elements per scale along the input dim (W4A16: g,
    NVFP4: 16; None for per-channel). `symmetric` False means stored zero points (W4A16 only)."""

    weight: WeightFormat
    group_size: int | None = None
    symmetric: bool = True
    activations: ActivationQuant = ActivationQuant.NONE


@dataclass(frozen=True)
class ConfigGroup:
    """One `config_groups` entry: the modules it targets and how they are stored."""

    targets: tuple[str, ...]
    format: LinearFormat


class MatchStyle(StrEnum):
    """How `ignore` entries match module names (see the module docstring)."""

    COMPRESSED_TENSORS = "compressed-tensors"
    GLOB = "glob"


@dataclass(frozen=True)
class QuantScheme:
    """Which linears are quantised and how. Invariant: every group has at least one target.

    `quant_method` names the producer (`compressed-tensors`, `modelopt`, or `online` for a scheme
    applied at load to a plain checkpoint). `kv_cache_scales`: the checkpoint stores KV-cache scales
    (`k_scale`, `v_scale`) that canvas-serve reads past (its KV cache stays in the compute dtype).
    """

    quant_method: str
    groups: tuple[ConfigGroup, ...]
    ignore: tuple[str, ...] = ()
    match_style: MatchStyle = MatchStyle.COMPRESSED_TENSORS
    kv_cache_scales: bool = False

    @property
    def is_online(self) -> bool:
        """True when the weights are quantised at load rather than stored quantised."""
        return self.quant_method == "online"

    def format_for(self, module: str) -> LinearFormat | None:
        """The storage of linear `module` (checkpoint name), or None when it stays plain."""
        if self._ignored(module):
            return None
        group = self._group_for(module)
        return None if group is None else group.format

    def experts_format(self, layer: str, num_experts: int) -> LinearFormat | None:
        """The one storage of all of a layer's experts (`layer` e.g. `model.decoder.layers.3`).

        Raises SchemeError when the experts' projections are not all stored alike: the engine keeps
        a layer's experts as stacked tensors, so they must share a format.
        """
        formats = {
            f"{layer}.experts.{e}.{proj}": self.format_for(f"{layer}.experts.{e}.{proj}")
            for e in range(num_experts)
            for proj in _EXPERT_PROJECTIONS
        }
        distinct = set(formats.values())
        if len(distinct) > 1:
            shown = ", ".join(
                f"{name}: {fmt.weight.value if fmt else 'plain'}" for name, fmt in formats.items()
            )
            raise SchemeError(
                f"the experts of {layer} are not all stored alike ({shown}); "
                "canvas-serve needs one format per layer"
            )
        return distinct.pop()

    def check_widths(self, input_widths: Mapping[str, int]) -> None:
        """Raise SchemeError when a quantised module's input width does not fit its format.

        `input_widths`: checkpoint module name -> in_features, for every linear of the model. A group
        size must divide the width ("704 -> 16, 32 or 64, not 128").
        """
        for module, width in input_widths.items():
            fmt = self.format_for(module)
            if fmt is not None and fmt.group_size is not None:
                try:
                    check_group_size(width, fmt.group_size, module)
                except ValueError as err:
                    raise SchemeError(str(err)) from err

    def _ignored(self, module: str) -> bool:
        if self.match_style == MatchStyle.GLOB:
            return any(module == entry or fnmatch.fnmatchcase(module, entry) for entry in self.ignore)
        return any(_name_matches(module, entry) for entry in self.ignore)

    def _group_for(self, module: str) -> ConfigGroup | None:
        ranked = [
            (rank, group)
            for group in self.groups
            if (rank := _target_rank(module, group.targets)) is not None
        ]
        if not ranked:
            return None
        best = min(rank for rank, _ in ranked)
        winners = [group for rank, group in ranked if rank == best]
        if len({group.format for group in winners}) > 1:
            raise SchemeError(f"{module} is targeted by several config_groups with different formats")
        return winners[0]


def _name_matches(module: str, entry: str) -> bool:
    """compressed-tensors' `match_name`: `re:` patterns with re.match, otherwise the exact name."""
    if entry.startswith("re:"):
        return re.match(entry.removeprefix("re:"), module) is not None
    return entry == module


def _target_rank(module: str, targets: tuple[str, ...]) -> int | None:
    """0 for an exact name, 1 for a regex, 2 for the `Linear` class; None when nothing matches."""
    ranks = [
        0 if target == module else 1 if target.startswith("re:") and _name_matches(module, target) else 2
        for target in targets
        if _name_matches(module, target) or target == LINEAR_CLASS
    ]
    return min(ranks, default=None)


def checkpoint_module(engine_name: str) -> str:
    """An engine module name (`layers.3.self_attn.q_proj`) as the checkpoint names it."""
    return DECODER_PREFIX + engine_name


# The published FP8 checkpoint's choices, reused when quantising at load: router, self-conditioning,
# embeddings, lm_head and vision stay plain; attention, dense MLP and experts are quantised.
_ONLINE_IGNORE = ("lm_head", "re:.*router.*", "re:.*self_conditioning.*", "re:.*vision.*")


def online_scheme(kind: str) -> QuantScheme:
    """`--quantization fp8` or `int8` for a plain checkpoint: per-channel weights quantised at load."""
    formats = {
        "fp8": LinearFormat(WeightFormat.FP8_CHANNEL, activations=ActivationQuant.FP8_DYNAMIC_TOKEN),
        "int8": LinearFormat(WeightFormat.INT8_CHANNEL),
    }
    if kind not in formats:
        raise SchemeError(
            f"--quantization {kind} cannot be applied at load; a plain checkpoint can be quantised to "
            f"{' or '.join(formats)}; "
            "other formats must be converted offline (python -m engine.quantization.convert)"
        )
    return QuantScheme("online", (ConfigGroup((LINEAR_CLASS,), formats[kind]),), _ONLINE_IGNORE)
