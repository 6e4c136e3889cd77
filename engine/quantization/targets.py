"""What each converter output format quantises, and the `quantization_config` it writes.

The choices are the published checkpoints':
- `fp8` (compressed-tensors `float-quantized`, as RedHatAI's FP8-dynamic): attention, dense MLP and
  experts quantised; router, self-conditioning MLP, vision, embeddings and lm_head in `ignore`.
- `w4a16` (compressed-tensors `pack-quantized`): the same modules, int4 groups.
- `nvfp4-ct` (compressed-tensors `nvfp4-pack-quantized`, as RedHatAI's NVFP4 recipe): the FP8
  ignore list plus `self_attn`, written as NVFP4A16 (no activation scales: data-free).
- `nvfp4-modelopt` (as nvidia's NVFP4): only the experts; ModelOpt's glob ignore list.

compressed-tensors `ignore` lists name every plain linear module, decoder and encoder aliases alike,
as llm-compressor writes them (tests/quantization/data/llmcompressor_configs.json); the argument
dicts are llm-compressor's (`observer: memoryless_minmax` is what the data-free quantisers here do).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

FORMATS = ("fp8", "w4a16", "nvfp4-ct", "nvfp4-modelopt")

MODELOPT_IGNORE = (
    "lm_head",
    "*embed_vision*",
    "*mlp*",
    "*router*",
    "*self_attn*",
    "*self_conditioning*",
    "*vision_tower*",
)

_DECODER_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.")
_ENCODER_ALIAS = "model.encoder.language_model.layers.{}."
_PLAIN_FOR_ALL = (re.compile(r"\.router\.proj$"), re.compile(r"^model\.decoder\.self_conditioning\."))
_PLAIN_FOR_NVFP4_CT = re.compile(r"\.self_attn\.[a-z]+_proj$")
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def _args(bits: int, kind: str, strategy: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "num_bits": bits,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": kind,
        "zp_dtype": None,
    }
    return base | extra


def _fp8_token_activations() -> dict[str, Any]:
    return _args(8, "float", "token", dynamic=True, observer=None)


def weight_args(
    fmt: str, group_size: int, symmetric: bool
) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """compressed-tensors (storage format, weight args, input activation args) for a converter format."""
    if fmt == "fp8":
        return "float-quantized", _args(8, "float", "channel"), _fp8_token_activations()
    if fmt == "w4a16":
        zp_dtype = None if symmetric else "torch.int8"
        weights = _args(4, "int", "group", group_size=group_size, symmetric=symmetric, zp_dtype=zp_dtype)
        return "pack-quantized", weights, None
    if fmt == "nvfp4-ct":
        weights = _args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
        return "nvfp4-pack-quantized", weights, None
    raise ValueError(f"unknown compressed-tensors format {fmt!r}; expected fp8, w4a16 or nvfp4-ct")


def compressed_tensors_ignore(
    fmt: str, linear_modules: Iterable[str], encoder_layers: Iterable[int]
) -> list[str]:
    """The plain modules for `fmt`: decoder linears it leaves plain (with their encoder aliases),
    vision linears, and lm_head. `linear_modules`: every linear module name the checkpoint stores."""
    encoder = set(encoder_layers)
    ignored: set[str] = set()
    for module in linear_modules:
        if not (module.startswith(_VISION) or _is_plain(fmt, module)):
            continue
        names = {module, module.removesuffix(".proj")}  # llm-compressor also lists the router itself
        if (match := _DECODER_LAYER.match(module)) and int(match.group(1)) in encoder:
            alias = _ENCODER_ALIAS.format(match.group(1))
            names |= {alias + name[match.end() :] for name in names}
        ignored |= names
    return [*sorted(ignored), "lm_head"]


def _is_plain(fmt: str, module: str) -> bool:
    if any(pattern.search(module) for pattern in _PLAIN_FOR_ALL):
        return True
    return fmt == "nvfp4-ct" and _PLAIN_FOR_NVFP4_CT.search(module) is not None


def quantization_config(
    fmt: str, ignore: list[str], group_size: int = 32, symmetric: bool = True
) -> dict[str, Any]:
    """The `quantization_config` block of config.json for converter format `fmt`."""
    if fmt == "nvfp4-modelopt":
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        return {
            "config_groups": {"group_0": {"input_activations": fp4, "weights": fp4, "targets": ["Linear"]}},
            "group_size": 16,
            "ignore": list(MODELOPT_IGNORE),
            "kv_cache_scheme": None,
            "quant_algo": "NVFP4",
            "quant_method": "modelopt",
            "producer": {"name": "canvas-serve"},
        }
    storage, weights, activations = weight_args(fmt, group_size, symmetric)
    group: dict[str, Any] = {
        "format": storage,
        "input_activations": activations,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    return {
        "config_groups": {"group_0": group},
        "format": storage,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }


def hf_quant_config() -> dict[str, Any]:
    """ModelOpt's hf_quant_config.json, written next to config.json for `nvfp4-modelopt`."""
    return {
        "producer": {"name": "canvas-serve"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": list(MODELOPT_IGNORE),
        },
    }
