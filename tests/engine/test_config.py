"""ModelConfig.from_hf on both config.json forms, the 26B-A4B shape, defaults and rejected configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

from engine.config import ConfigError, ModelConfig
from engine.model.layers import rope_inv_freq
from recipes.reference_config import DIFFUSIONGEMMA_26B_TEXT, FULL, SLIDING
from tests.engine.checkpoints import TEXT, save_reference

TEXT_26B = DIFFUSIONGEMMA_26B_TEXT
FULL_26B = (5, 11, 17, 23, 29)


def hf_config(text: dict[str, Any], canvas_length: int = 256) -> dict[str, Any]:
    """A config.json dict in the raw form (text fields exactly as given)."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas_length,
        "text_config": {"model_type": "diffusion_gemma_text"} | text,
    }


@pytest.fixture(scope="module")
def saved_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("tiny")
    save_reference(path)
    data: dict[str, Any] = json.loads((path / "config.json").read_text())
    return data


def test_saved_config_uses_per_layer_config(saved_config: dict[str, Any]) -> None:
    text = saved_config["text_config"]
    assert "per_layer_config" in text
    assert "global_head_dim" not in text and "num_global_key_value_heads" not in text


def test_raw_and_serialised_forms_give_the_same_layers(saved_config: dict[str, Any]) -> None:
    raw = ModelConfig.from_hf(hf_config(TEXT, canvas_length=16))
    saved = ModelConfig.from_hf(saved_config)
    assert saved == raw
    assert [(s.kind, s.head_dim, s.num_kv_heads) for s in raw.layers] == [
        ("sliding", 16, 2),
        ("full", 32, 1),
        ("sliding", 16, 2),
        ("full", 32, 1),
    ]


def test_per_layer_config_keyed_by_layer_type(saved_config: dict[str, Any]) -> None:
    text = {k: v for k, v in TEXT.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    text["per_layer_config"] = {FULL: {"head_dim": 32, "num_key_value_heads": 1}}
    assert ModelConfig.from_hf(hf_config(text, canvas_length=16)) == ModelConfig.from_hf(saved_config)


def test_26b_a4b_text_config() -> None:
    config = ModelConfig.from_hf(hf_config(TEXT_26B))
    assert (config.hidden_size, config.num_layers, config.num_heads) == (2816, 30, 16)
    assert (config.num_experts, config.top_k_experts) == (128, 8)
    assert (config.moe_intermediate_size, config.intermediate_size) == (704, 2112)
    assert (config.vocab_size, config.canvas_length, config.sliding_window) == (262_144, 256, 1024)
    assert config.eos_token_ids == (1, 106, 50)
    for i, spec in enumerate(config.layers):
        if i in FULL_26B:
            assert (spec.kind, spec.head_dim, spec.num_kv_heads, spec.has_v_proj) == ("full", 512, 2, False)
            assert (spec.rope.rope_type, spec.rope.theta, spec.rope.partial_rotary_factor) == (
                "proportional",
                1e6,
                0.25,
            )
        else:
            assert (spec.kind, spec.head_dim, spec.num_kv_heads, spec.has_v_proj) == ("sliding", 256, 8, True)
            assert (spec.rope.rope_type, spec.rope.theta) == ("default", 1e4)


def test_26b_serialised_form_matches_raw_form(tmp_path: Path) -> None:
    """The config.json transformers saves zero-pads per_layer_config keys ("05", "11", ...)."""
    DiffusionGemmaConfig(text_config=dict(TEXT_26B)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "05" in data["text_config"]["per_layer_config"]
    data["architectures"] = ["DiffusionGemmaForBlockDiffusion"]  # written by the model, not the config
    assert ModelConfig.from_hf(data) == ModelConfig.from_hf(hf_config(TEXT_26B))


def test_rope_inv_freq_matches_transformers_for_26b() -> None:
    config = ModelConfig.from_hf(hf_config(TEXT_26B))
    rotary = DiffusionGemmaTextRotaryEmbedding(DiffusionGemmaTextConfig(**TEXT_26B))
    full, sliding = config.layers[FULL_26B[0]], config.layers[0]
    ours_full = rope_inv_freq(full.rope, full.head_dim)
    assert ours_full.shape == (256,) and int((ours_full != 0).sum()) == 64
    torch.testing.assert_close(ours_full, rotary.full_attention_inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(
        rope_inv_freq(sliding.rope, sliding.head_dim), rotary.sliding_attention_inv_freq, rtol=0, atol=0
    )


def test_missing_layer_types_follow_the_reference() -> None:
    """5 sliding : 1 full, and the last layer is forced to full (layers 5 and 7 of 8)."""
    text = TEXT | {"num_hidden_layers": 8}
    del text["layer_types"]
    config = ModelConfig.from_hf(hf_config(text))
    reference = DiffusionGemmaTextConfig(**text).layer_types
    assert reference == [SLIDING] * 5 + [FULL, SLIDING, FULL]
    assert config.layer_kinds == tuple("full" if t == FULL else "sliding" for t in reference)
    assert [s.head_dim for s in config.layers] == [16] * 5 + [32, 16, 32]


def test_given_layer_types_end_in_full_like_the_reference() -> None:
    text = TEXT | {"layer_types": [SLIDING, FULL, SLIDING, SLIDING]}
    config = ModelConfig.from_hf(hf_config(text))
    assert config.layer_kinds == ("sliding", "full", "sliding", "full")
    assert config.layers[-1].head_dim == 32


def test_defaults_when_optional_fields_are_absent() -> None:
    text = {k: v for k, v in TEXT.items() if k != "global_head_dim"}
    del text["num_global_key_value_heads"]
    config = ModelConfig.from_hf(hf_config(text) | {"canvas_length": None})
    assert config.canvas_length == 256
    full = config.layers[1]
    assert (full.head_dim, full.num_kv_heads) == (512, 2)  # global_head_dim 512; kv heads unchanged
    assert (full.rope.rope_type, full.rope.partial_rotary_factor, full.rope.theta) == (
        "proportional",
        0.25,
        1e6,
    )
    assert config.eos_token_ids == (1,)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"layer_types": [SLIDING, FULL, FULL]}, "layer_types has 3 entries for num_hidden_layers=4"),
        ({"layer_types": [SLIDING, "chunked_attention", SLIDING, FULL]}, "chunked_attention"),
        ({"top_k_experts": 5}, "top_k_experts=5"),
        ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        ({"rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1e4}}}, "rope_type 'yarn'"),
        ({"num_attention_heads": 3}, "not a multiple"),
        ({"hidden_size": None}, "missing 'hidden_size'"),
    ],
)
def test_invalid_configs_are_rejected(edit: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf_config(TEXT | edit))


def test_unsupported_architecture_is_rejected() -> None:
    data = hf_config(TEXT) | {"model_type": "gemma4", "architectures": ["Gemma4ForCausalLM"]}
    with pytest.raises(ConfigError, match="Gemma4ForCausalLM"):
        ModelConfig.from_hf(data)


def test_a_config_without_text_config_is_rejected() -> None:
    data = hf_config(TEXT)
    del data["text_config"]
    with pytest.raises(ConfigError, match="text_config"):
        ModelConfig.from_hf(data)
