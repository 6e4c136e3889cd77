"""transformers' `DiffusionGemmaConfig` for the text-only checkpoints we write ourselves.

Tests, benchmarks and recipes save checkpoints with transformers so that they are genuine
DiffusionGemma checkpoints; the config class insists on a vision tower, so they all get this minimal
one (its weights are skipped by our loader) and image token ids at the top of the vocabulary. It
lives outside the engine package because it needs transformers, which serving does not.
"""

from __future__ import annotations

from typing import Any

MINIMAL_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
)


SLIDING, FULL = "sliding_attention", "full_attention"

DIFFUSIONGEMMA_26B_TEXT: dict[str, Any] = dict(
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    layer_types=([SLIDING] * 5 + [FULL]) * 5,
    sliding_window=1024,
    rope_parameters={
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262_144,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    eos_token_id=[1, 106, 50],
)
"""The released 26B-A4B text config as third-party copies of its config.json give it (the real
checkpoint's file is the authority at load time; this is for benchmarks and tests)."""


def text_only_config(text: dict[str, Any], canvas_length: int) -> Any:
    """A `DiffusionGemmaConfig` around `text`, with the minimal vision tower and image ids V-3..V-1."""
    from transformers import DiffusionGemmaConfig

    vocab = int(text["vocab_size"])
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=MINIMAL_VISION_CONFIG,
        canvas_length=canvas_length,
        image_token_id=vocab - 3,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 1,
    )
