"""transformers' `DiffusionGemmaConfig` for the text-only checkpoints we write ourselves.

Tests, benchmarks and recipes save checkpoints with transformers so that they are genuine
DiffusionGemma checkpoints; the config class insists on a vision tower, so they all get this minimal
one (its weights are skipped by our loader) and image token ids at the top of the vocabulary.
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
