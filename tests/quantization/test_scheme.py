"""quantization_config -> QuantScheme: the configs llm-compressor writes, ModelOpt's, and clear errors.

`data/llmcompressor_configs.json` holds the `quantization_config`s llm-compressor 0.14 wrote for a tiny
DiffusionGemma (data/README.md says how); the ModelOpt config is the published one's keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from engine.quantization.parse import parse_quantization_config, resolve_quantization
from engine.quantization.scheme import (
    ActivationQuant,
    LinearFormat,
    QuantScheme,
    SchemeError,
    WeightFormat,
    checkpoint_module,
    online_scheme,
)

CONFIGS = json.loads((Path(__file__).parent / "data" / "llmcompressor_configs.json").read_text())
MODELOPT: dict[str, Any] = {
    "quant_method": "modelopt",
    "quant_algo": "NVFP4",
    "group_size": 16,
    "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    "ignore": [
        "lm_head",
        "*embed_vision*",
        "*mlp*",
        "*router*",
        "*self_attn*",
        "*self_conditioning*",
        "*vision_tower*",
    ],
}
Q = "model.decoder.layers.1.self_attn.q_proj"
DENSE = "model.decoder.layers.1.mlp.down_proj"
EXPERT = "model.decoder.layers.1.experts.3.down_proj"
ROUTER = "model.decoder.layers.1.router.proj"
SELF_COND = "model.decoder.self_conditioning.gate_proj"


def formats(scheme: QuantScheme) -> dict[str, WeightFormat | None]:
    names = (Q, DENSE, EXPERT, ROUTER, SELF_COND, "lm_head")
    return {name: (fmt.weight if (fmt := scheme.format_for(name)) else None) for name in names}


def test_fp8_dynamic_as_llmcompressor_writes_it() -> None:
    scheme = parse_quantization_config(CONFIGS["FP8_DYNAMIC"])
    fp8 = WeightFormat.FP8_CHANNEL
    assert formats(scheme) == {
        Q: fp8,
        DENSE: fp8,
        EXPERT: fp8,
        ROUTER: None,
        SELF_COND: None,
        "lm_head": None,
    }
    assert scheme.format_for(Q) == LinearFormat(fp8, activations=ActivationQuant.FP8_DYNAMIC_TOKEN)


@pytest.mark.parametrize(("name", "symmetric"), [("W4A16", True), ("W4A16_ASYM", False)])
def test_w4a16_as_llmcompressor_writes_it(name: str, symmetric: bool) -> None:
    scheme = parse_quantization_config(CONFIGS[name])
    assert scheme.format_for(EXPERT) == LinearFormat(WeightFormat.W4A16, 32, symmetric)
    assert scheme.format_for(ROUTER) is None


def test_nvfp4_ct_as_llmcompressor_writes_it() -> None:
    scheme = parse_quantization_config(CONFIGS["NVFP4A16"])
    assert scheme.format_for(DENSE) == LinearFormat(WeightFormat.NVFP4_CT, 16)
    assert scheme.experts_format("model.decoder.layers.1", 4) == LinearFormat(WeightFormat.NVFP4_CT, 16)


def test_modelopt_quantises_only_the_experts() -> None:
    scheme = parse_quantization_config(MODELOPT)
    nv = WeightFormat.NVFP4_MODELOPT
    assert formats(scheme) == {
        Q: None,
        DENSE: None,
        EXPERT: nv,
        ROUTER: None,
        SELF_COND: None,
        "lm_head": None,
    }
    assert scheme.kv_cache_scales and scheme.format_for(EXPERT) == LinearFormat(
        nv, 16, True, ActivationQuant.NVFP4
    )


def test_modelopt_hf_quant_config_form() -> None:
    hf_quant = {
        "quant_method": "modelopt",
        "quantization": {"quant_algo": "W4A16_NVFP4", "group_size": 16, "exclude_modules": ["*self_attn*"]},
    }
    scheme = parse_quantization_config(hf_quant)
    assert scheme.format_for(Q) is None and scheme.format_for(DENSE) is not None
    assert not scheme.kv_cache_scales


def test_regex_and_exact_targets_pick_the_most_specific_group() -> None:
    config = copy.deepcopy(CONFIGS["W4A16"])
    weights = config["config_groups"]["group_0"]["weights"]
    config["config_groups"]["experts"] = {
        "targets": ["re:.*experts.*"],
        "weights": weights | {"group_size": 16},
    }
    config["config_groups"]["one"] = {"targets": [DENSE], "weights": weights | {"group_size": 64}}
    scheme = parse_quantization_config(config)
    group = {name: fmt.group_size for name in (Q, DENSE, EXPERT) if (fmt := scheme.format_for(name))}
    assert group == {Q: 32, DENSE: 64, EXPERT: 16}


def test_regex_ignore_is_anchored_at_the_start_only() -> None:
    config = copy.deepcopy(CONFIGS["FP8_DYNAMIC"]) | {"ignore": ["re:.*experts\\.3\\.", "self_attn"]}
    scheme = parse_quantization_config(config)
    assert scheme.format_for(EXPERT) is None  # re.match, not fullmatch
    assert scheme.format_for("model.decoder.layers.1.experts.2.down_proj") is not None
    assert scheme.format_for(Q) is not None  # a plain entry is an exact name, not a substring


def test_preset_shorthand() -> None:
    scheme = parse_quantization_config(
        {"quant_method": "compressed-tensors", "config_groups": {"W4A16": ["Linear"]}}
    )
    assert scheme.format_for(Q) == LinearFormat(WeightFormat.W4A16, 128)


def test_experts_must_agree() -> None:
    config = copy.deepcopy(CONFIGS["FP8_DYNAMIC"])
    config["ignore"].append(EXPERT)
    scheme = parse_quantization_config(config)
    with pytest.raises(SchemeError, match=r"experts of model\.decoder\.layers\.1 are not all stored alike"):
        scheme.experts_format("model.decoder.layers.1", 4)


def test_group_size_that_does_not_divide_a_width() -> None:
    scheme = parse_quantization_config(
        {"quant_method": "compressed-tensors", "config_groups": {"W4A16": ["Linear"]}}
    )
    with pytest.raises(
        SchemeError,
        match=rf"{EXPERT}: group_size 128 does not divide its input width 704; "
        "group sizes that do: 16 or 32 or 64",
    ):
        scheme.check_widths({Q: 2816, EXPERT: 704})
    scheme.check_widths({Q: 2816, ROUTER: 2816})


def edit(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    edited = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = edited
    for key in parents:
        node = node[key]
    node[leaf] = value
    return edited


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
        (edit(CONFIGS["FP8_DYNAMIC"], "quantization_status", "frozen"), "quantization_status 'frozen'"),
        (
            edit(CONFIGS["W4A16"], "config_groups.group_0.format", "marlin-24"),
            "format 'marlin-24' is not supported",
        ),
        (edit(CONFIGS["W4A16"], "config_groups.group_0.weights.num_bits", 8), r"group_0.weights \(8-bit int"),
        (edit(CONFIGS["FP8_DYNAMIC"], "config_groups.group_0.weights.strategy", "block"), "strategy block"),
        (edit(CONFIGS["W4A16"], "config_groups.group_0.weights.actorder", "group"), "actorder 'group'"),
        (
            edit(
                CONFIGS["W4A16"],
                "config_groups.group_0.input_activations",
                {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
            ),
            "input_activations",
        ),
        (
            edit(CONFIGS["W4A16"], "config_groups.group_0.targets", ["Embedding"]),
            "'Embedding' names a module class",
        ),
        (edit(CONFIGS["W4A16"], "sparsity_config", {"format": "sparse-24-bitmask"}), "sparsity_config"),
        (edit(MODELOPT, "quant_algo", "FP8"), "modelopt quant_algo 'FP8' is not supported"),
        (edit(MODELOPT, "group_size", 32), "group_size 32"),
    ],
)
def test_unsupported_schemes_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemeError, match=message):
        parse_quantization_config(config)


def test_resolve_quantization_flag() -> None:
    plain: dict[str, Any] = {"model_type": "diffusion_gemma"}
    assert resolve_quantization(plain, None) is None
    assert online_scheme("int8") == resolve_quantization(plain, "int8")
    fp8 = resolve_quantization(plain, "fp8")
    assert fp8 is not None and fp8.is_online
    assert (
        fp8.format_for(EXPERT) is not None
        and fp8.format_for(ROUTER) is None
        and fp8.format_for(SELF_COND) is None
    )
    with pytest.raises(SchemeError, match="can be quantised to fp8 or int8"):
        resolve_quantization(plain, "awq")
    quantized = plain | {"quantization_config": MODELOPT}
    assert resolve_quantization(quantized, "modelopt_fp4") == resolve_quantization(quantized, None)
    with pytest.raises(SchemeError, match="does not match the checkpoint, which is quantised with modelopt"):
        resolve_quantization(quantized, "fp8")


def test_engine_names() -> None:
    assert checkpoint_module("layers.3.self_attn.q_proj") == "model.decoder.layers.3.self_attn.q_proj"
