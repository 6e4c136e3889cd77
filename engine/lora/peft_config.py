"""`adapter_config.json` of a PEFT LoRA adapter -> `PeftLoRAConfig` (no torch).

What the engine takes from it: the rank `r` and `lora_alpha`, `use_rslora`, the per-module
`rank_pattern` / `alpha_pattern`, and `target_parameters` (PEFT's form for the 3-D expert weights).
Scaling follows PEFT 0.21: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, where a module's `r` and
`alpha` come from the first pattern key `k` for which `(.*\\.)?(k)$` matches the module's PEFT name
(`model.decoder.layers.0.self_attn.o_proj`; a targeted parameter's name ends with the parameter,
`model.decoder.layers.0.experts.gate_up_proj`), else the global values.

Options that change the math beyond `W + scaling * B @ A` (DoRA, LoRA biases, trained `bias`,
`modules_to_save`, trainable tokens, initialisations that rewrite the base weights, LoRA variants) are
refused with a `LoRAError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.lora.errors import LoRAError

CONFIG_FILE = "adapter_config.json"

BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""`init_lora_weights` values under which PEFT changes the base weights too: the adapter only works on
that changed base (PEFT can convert such an adapter into a plain one: `path_initial_model_for_weight_
conversion` in `save_pretrained`)."""

_MUST_BE_EMPTY = (
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
    "use_bdlora",
)
"""Fields whose every non-empty value asks for something beyond plain LoRA on linear weights."""

_MUST_BE_FALSE = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora")


@dataclass(frozen=True)
class PeftLoRAConfig:
    """The parts of a PEFT `LoraConfig` that decide an adapter's math."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()

    def rank_of(self, module: str) -> int:
        """The rank PEFT gave `module` (its PEFT name, e.g. `model.decoder.layers.0.mlp.up_proj`)."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def scaling_of(self, module: str) -> float:
        """`alpha / r` (`alpha / sqrt(r)` with rsLoRA) for `module`, as PEFT's LoRA layer computes it."""
        rank = self.rank_of(module)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def pattern_key(patterns: dict[str, Any], module: str) -> str:
    """The first key `k` of `patterns` with `(.*\\.)?(k)$` matching `module`, else `module` itself
    (PEFT's rule: a key names a module by a dotted suffix, or is a regular expression).

    Example: keys ("o_proj",) and module `model.decoder.layers.0.self_attn.o_proj` -> "o_proj".
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_peft_config(root: Path) -> PeftLoRAConfig:
    """Read and check `root/adapter_config.json`; `LoRAError` naming the field at fault."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise LoRAError(f"{CONFIG_FILE} is missing from {root}: give a PEFT LoRA adapter directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoRAError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise LoRAError(f"{path} must hold a JSON object")
    _check_supported(data, path)
    return PeftLoRAConfig(
        r=_positive_int(data.get("r", 8), "r", path),
        lora_alpha=_number(data.get("lora_alpha", 8), "lora_alpha", path),
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern={
            k: _positive_int(v, f"rank_pattern[{k!r}]", path)
            for k, v in _dict(data, "rank_pattern", path).items()
        },
        alpha_pattern={
            k: _number(v, f"alpha_pattern[{k!r}]", path)
            for k, v in _dict(data, "alpha_pattern", path).items()
        },
        target_parameters=tuple(data.get("target_parameters") or ()),
    )


def _check_supported(data: dict[str, Any], path: Path) -> None:
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAError(
            f"{path}: peft_type {peft_type!r} is not served: only LoRA adapters (peft_type LORA) are"
        )
    for name in _MUST_BE_FALSE:
        if data.get(name):
            raise LoRAError(
                f"{path}: {name}={data[name]!r} is not supported: serve an adapter trained without it"
            )
    for name in _MUST_BE_EMPTY:
        if data.get(name):
            raise LoRAError(
                f"{path}: {name}={data[name]!r} is not supported: serve an adapter with {name} unset "
                "(plain LoRA on linear and expert weights only)"
            )
    bias = data.get("bias", "none")
    if bias != "none":
        raise LoRAError(
            f"{path}: bias={bias!r} trains biases, which DiffusionGemma has none of: use bias='none'"
        )
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise LoRAError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights: convert the adapter with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and serve the result"
        )


def _dict(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise LoRAError(f"{path}: {name} must be a JSON object, got {value!r}")
    return value


def _positive_int(value: Any, name: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LoRAError(f"{path}: {name}={value!r} must be a positive integer")
    return value


def _number(value: Any, name: str, path: Path) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise LoRAError(f"{path}: {name}={value!r} must be a finite number")
    return float(value)
