"""Read a checkpoint's `quantization_config` into a `QuantScheme`; resolve `--quantization`.

Supported, everything else is a `SchemeError` naming the key and value at fault:
- `"quant_method": "compressed-tensors"`, `"quantization_status": "compressed"`, each config group
  (`targets`, `weights`, `input_activations`, `output_activations`, per-group or top-level `format`):
  - `float-quantized`: weights 8-bit float, strategy `channel`, symmetric, static (FP8_DYNAMIC);
  - `pack-quantized`: weights 4-bit int, strategy `group` with `group_size`, symmetric or not (W4A16);
  - `nvfp4-pack-quantized`: weights 4-bit float, strategy `tensor_group`, group 16 (NVFP4A16/NVFP4);
  input activations: none, FP8 per token dynamic, or NVFP4 (served weight-only). `ignore` entries are
  exact names or `re:` patterns. Preset shorthand (`"config_groups": {"W4A16": ["Linear"]}`) works for
  the presets above. Sparsity and transform configs are refused.
- `"quant_method": "modelopt"` with `"quant_algo": "NVFP4"` or `"W4A16_NVFP4"`, `"group_size": 16`:
  the config.json form (`ignore`, `kv_cache_scheme`) and hf_quant_config.json's (`quantization`:
  `exclude_modules`, `kv_cache_quant_algo`).

Keys confirmed against compressed-tensors 0.20.1 (`quantization/quant_config.py` `QuantizationConfig`,
`quant_scheme.py` presets, `quant_args.py` `QuantizationArgs`), the configs llm-compressor 0.14 wrote
for a tiny DiffusionGemma on this machine (tests/quantization/data), and vLLM `modelopt.py`
(`ModelOptQuantConfigBase.from_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.quantization.scheme import (
    LINEAR_CLASS,
    ActivationQuant,
    ConfigGroup,
    LinearFormat,
    MatchStyle,
    QuantScheme,
    SchemeError,
    WeightFormat,
    online_scheme,
)

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
_CT_FORMATS = {
    "float-quantized": WeightFormat.FP8_CHANNEL,
    "naive-quantized": WeightFormat.FP8_CHANNEL,
    "pack-quantized": WeightFormat.W4A16,
    "nvfp4-pack-quantized": WeightFormat.NVFP4_CT,
}
_PRESETS: dict[str, tuple[str, LinearFormat]] = {
    "FP8_DYNAMIC": (
        "float-quantized",
        LinearFormat(WeightFormat.FP8_CHANNEL, activations=ActivationQuant.FP8_DYNAMIC_TOKEN),
    ),
    "W4A16": ("pack-quantized", LinearFormat(WeightFormat.W4A16, group_size=128)),
    "W4A16_ASYM": ("pack-quantized", LinearFormat(WeightFormat.W4A16, group_size=128, symmetric=False)),
    "NVFP4A16": ("nvfp4-pack-quantized", LinearFormat(WeightFormat.NVFP4_CT, group_size=16)),
    "NVFP4": (
        "nvfp4-pack-quantized",
        LinearFormat(WeightFormat.NVFP4_CT, group_size=16, activations=ActivationQuant.NVFP4),
    ),
}
_MODELOPT_ALGOS = {"NVFP4": ActivationQuant.NVFP4, "W4A16_NVFP4": ActivationQuant.NONE}
_SUPPORTED = (
    "compressed-tensors (float-quantized FP8 per channel, pack-quantized W4A16, nvfp4-pack-quantized) "
    "and modelopt NVFP4"
)


def resolve_quantization(hf_config: Mapping[str, Any], requested: str | None) -> QuantScheme | None:
    """The scheme to serve `hf_config` (a checkpoint's config.json) with, `--quantization` as vLLM spells it.

    Quantised checkpoint: its own scheme; `requested` may only name it (`compressed-tensors`,
    `modelopt`, `modelopt_fp4`). Plain checkpoint: None, or `fp8` / `int8` quantised at load.
    """
    config = hf_config.get("quantization_config")
    if config is None:
        return None if requested is None else online_scheme(requested)
    scheme = parse_quantization_config(config)
    aliases = {scheme.quant_method} | ({"modelopt_fp4"} if scheme.quant_method == MODELOPT else set())
    if requested is not None and requested not in aliases:
        raise SchemeError(
            f"--quantization {requested} does not match the checkpoint, which is quantised with "
            f"{scheme.quant_method}: leave --quantization out (the checkpoint's is detected) "
            f"or pass {scheme.quant_method}"
        )
    return scheme


def parse_quantization_config(config: Mapping[str, Any]) -> QuantScheme:
    """A checkpoint's `quantization_config` (or hf_quant_config.json) -> its frozen scheme."""
    method = str(config.get("quant_method", "")).lower()
    if method == COMPRESSED_TENSORS:
        return _parse_compressed_tensors(config)
    if method.startswith(MODELOPT):
        return _parse_modelopt(config)
    raise SchemeError(
        f"quantization_config.quant_method {method or 'missing'!r} is not supported; "
        f"canvas-serve loads {_SUPPORTED}"
    )


# ---- compressed-tensors -----------------------------------------------------------------------------


def _parse_compressed_tensors(config: Mapping[str, Any]) -> QuantScheme:
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise SchemeError(
            f"quantization_status {status!r}: canvas-serve loads compressed checkpoints only "
            "(save with save_compressed=True)"
        )
    for key in ("sparsity_config", "transform_config"):
        if config.get(key):
            raise SchemeError(
                f"quantization_config.{key} is set; sparse or transformed (rotated) weights are not supported"
            )
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise SchemeError("quantization_config.config_groups is missing or empty")
    top_format = config.get("format")
    parsed = tuple(_ct_group(str(name), group, top_format) for name, group in groups.items())
    return QuantScheme(
        COMPRESSED_TENSORS,
        parsed,
        ignore=tuple(str(entry) for entry in config.get("ignore") or ()),
        match_style=MatchStyle.COMPRESSED_TENSORS,
        kv_cache_scales=config.get("kv_cache_scheme") is not None,
    )


def _ct_group(name: str, group: Any, top_format: Any) -> ConfigGroup:
    where = f"config_groups.{name}"
    if isinstance(group, list):  # preset shorthand: {"W4A16": ["Linear"]}
        return ConfigGroup(_targets(group, where), _preset(name, top_format))
    if not isinstance(group, Mapping):
        raise SchemeError(f"{where} must be an object or a list of targets")
    fmt = group.get("format") or top_format
    if fmt not in _CT_FORMATS:
        raise SchemeError(f"{where}: format {fmt!r} is not supported; supported: {', '.join(_CT_FORMATS)}")
    if group.get("output_activations") is not None:
        raise SchemeError(f"{where}: output_activations quantisation is not supported")
    weights = _ct_weights(group.get("weights"), str(fmt), where)
    activations = _ct_activations(group.get("input_activations"), weights.weight, where)
    linear = LinearFormat(weights.weight, weights.group_size, weights.symmetric, activations)
    return ConfigGroup(_targets(group.get("targets"), where), linear)


def _preset(name: str, top_format: Any) -> LinearFormat:
    if name.upper() not in _PRESETS:
        raise SchemeError(f"config_groups preset {name!r} is not supported; supported: {', '.join(_PRESETS)}")
    fmt, linear = _PRESETS[name.upper()]
    if top_format not in (None, fmt, "mixed-precision"):
        raise SchemeError(f"preset {name} is stored as {fmt}, but the config's format is {top_format!r}")
    return linear


def _targets(targets: Any, where: str) -> tuple[str, ...]:
    if not isinstance(targets, list) or not targets:
        raise SchemeError(f"{where}.targets must be a non-empty list")
    for target in targets:
        if target[:1].isupper() and target != LINEAR_CLASS:  # a class name (module names are lower case)
            raise SchemeError(
                f"{where}.targets: {target!r} names a module class other than Linear; "
                "only linears are quantised"
            )
    return tuple(str(target) for target in targets)


def _ct_weights(args: Any, fmt: str, where: str) -> LinearFormat:
    if not isinstance(args, Mapping):
        raise SchemeError(f"{where}.weights is missing: weight-only or weight+activation schemes only")
    bits, kind = args.get("num_bits"), args.get("type", "int")
    strategy, group = args.get("strategy"), args.get("group_size")
    symmetric = bool(args.get("symmetric", True))
    described = f"{where}.weights ({bits}-bit {kind}, strategy {strategy}, group_size {group}, format {fmt})"
    if args.get("dynamic") or args.get("block_structure"):
        raise SchemeError(f"{described}: dynamic or block-wise weight scales are not supported")
    if str(args.get("actorder")).lower() in ("group", "dynamic"):
        raise SchemeError(f"{described}: actorder {args.get('actorder')!r} (g_idx) is not supported")
    expected = _CT_FORMATS[fmt]
    if expected == WeightFormat.FP8_CHANNEL and (bits, kind, strategy, symmetric) == (
        8,
        "float",
        "channel",
        True,
    ):
        return LinearFormat(WeightFormat.FP8_CHANNEL)
    if (
        expected == WeightFormat.W4A16
        and (bits, kind, strategy) == (4, "int", "group")
        and isinstance(group, int)
    ):
        return LinearFormat(WeightFormat.W4A16, group, symmetric)
    if expected == WeightFormat.NVFP4_CT and (bits, kind, strategy, group, symmetric) == (
        4,
        "float",
        "tensor_group",
        16,
        True,
    ):
        return LinearFormat(WeightFormat.NVFP4_CT, 16)
    raise SchemeError(
        f"{described} is not supported; supported: 8-bit float channel (float-quantized), 4-bit int group "
        "(pack-quantized), 4-bit float tensor_group 16 (nvfp4-pack-quantized)"
    )


def _ct_activations(args: Any, weight: WeightFormat, where: str) -> ActivationQuant:
    if args is None:
        return ActivationQuant.NONE
    bits, kind, strategy = args.get("num_bits"), args.get("type"), args.get("strategy")
    if (
        weight == WeightFormat.FP8_CHANNEL
        and (bits, kind, strategy) == (8, "float", "token")
        and args.get("dynamic")
    ):
        return ActivationQuant.FP8_DYNAMIC_TOKEN
    if weight == WeightFormat.NVFP4_CT and (bits, kind, strategy) == (4, "float", "tensor_group"):
        return ActivationQuant.NVFP4
    raise SchemeError(
        f"{where}.input_activations ({bits}-bit {kind}, strategy {strategy}, dynamic {args.get('dynamic')}) "
        f"with {weight.value} weights is not supported; supported: none, FP8 dynamic per token, NVFP4"
    )


# ---- ModelOpt ---------------------------------------------------------------------------------------


def _parse_modelopt(config: Mapping[str, Any]) -> QuantScheme:
    inner = config.get("quantization")
    if isinstance(inner, Mapping):  # hf_quant_config.json
        algo, group = inner.get("quant_algo"), inner.get("group_size")
        ignore, kv_cache = inner.get("exclude_modules") or [], inner.get("kv_cache_quant_algo") is not None
    else:  # config.json's quantization_config
        algo, group = config.get("quant_algo"), config.get("group_size")
        ignore, kv_cache = config.get("ignore") or [], config.get("kv_cache_scheme") is not None
    algo = str(algo).upper()
    if algo not in _MODELOPT_ALGOS:
        raise SchemeError(
            f"modelopt quant_algo {algo!r} is not supported; supported: {', '.join(_MODELOPT_ALGOS)}"
        )
    if group not in (None, 16):
        raise SchemeError(f"modelopt NVFP4 group_size {group} is not supported; NVFP4 uses 16")
    linear = LinearFormat(WeightFormat.NVFP4_MODELOPT, 16, activations=_MODELOPT_ALGOS[algo])
    groups = (ConfigGroup((LINEAR_CLASS,), linear),)
    return QuantScheme(MODELOPT, groups, tuple(str(e) for e in ignore), MatchStyle.GLOB, kv_cache)
