"""The Sudoku model's DiffusionGemma config, its initial checkpoint, and writing trained weights back.

The initial checkpoint is built and saved by transformers' own `DiffusionGemmaForBlockDiffusion`, so the
file layout, weight names and config are exactly what transformers (and our loader) expect. Training
loads it with `engine.model.loader.load_checkpoint` and `save_checkpoint` writes the trained weights back
under the checkpoint names (the inverse of `engine.model.loader.our_name`), keeping the template's
vision-tower weights so the file stays complete for transformers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.diffusion_gemma import DiffusionGemma
from recipes.reference_config import MINIMAL_VISION_CONFIG
from recipes.sudoku import tokens

WEIGHTS = "model.safetensors"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def rope_theta_for_period(period: float, head_dim: int) -> float:
    """The RoPE base whose second frequency pair turns once every `period` positions.

    inv_freq_j = theta^(-2j / head_dim); j = 1 gives 2*pi/period when theta = (period / 2pi)^(head_dim/2).
    With period 9, cells in the same Sudoku column (offsets that are multiples of 9) line up.
    """
    return float((period / (2 * math.pi)) ** (head_dim / 2))


def text_config(**overrides: Any) -> dict[str, Any]:
    """The shipped model's text config: 8 layers (6th and 8th full attention, the rest sliding), hidden 128,
    4 experts top-2."""
    head_dim, global_head_dim = 32, 64
    config: dict[str, Any] = dict(
        vocab_size=tokens.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=2,
        sliding_window=256,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=128,
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
        use_bidirectional_attention="vision",
        initializer_range=0.02,
        pad_token_id=tokens.PAD,
        bos_token_id=tokens.BOS,
        eos_token_id=tokens.EOS,
        tie_word_embeddings=True,
    )
    config |= overrides
    layers = config["num_hidden_layers"]
    config.setdefault(
        "layer_types",
        [
            "full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
            for i in range(layers)
        ],
    )
    config.setdefault(
        "rope_parameters",
        {
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": rope_theta_for_period(9, config["head_dim"]),
            },
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": rope_theta_for_period(9, config["global_head_dim"]),
            },
        },
    )
    return config


"""A minimal vision tower: the config class requires one; text serving never runs it."""

GENERATION: dict[str, Any] = dict(
    max_new_tokens=tokens.CANVAS_LENGTH,
    max_denoising_steps=48,
    sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
    bos_token_id=tokens.BOS,
    eos_token_id=[tokens.EOS],
    pad_token_id=tokens.PAD,
)
"""Sampler defaults written to generation_config.json (the shipped values are tuned by tune.py)."""


def write_generation_config(path: Path, **overrides: Any) -> None:
    data = GENERATION | overrides
    (path / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def init_checkpoint(path: Path, seed: int = 0, **text_overrides: Any) -> None:
    """Save a freshly initialised (transformers init, fp32) Sudoku model with tokenizer and configs."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=text_config(**text_overrides),
        vision_config=MINIMAL_VISION_CONFIG,
        canvas_length=tokens.CANVAS_LENGTH,
        image_token_id=tokens.IMAGE,
        boi_token_id=tokens.BOI,
        eoi_token_id=tokens.EOI,
        eos_token_id=tokens.EOS,
        pad_token_id=tokens.PAD,
        bos_token_id=tokens.BOS,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokens.save_tokenizer(path)
    write_generation_config(path)


def checkpoint_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (inverse of `engine.model.loader.our_name`).

    `layers.3.encoder_layer_scalar` -> `model.encoder.language_model.layers.3.layer_scalar`;
    anything else `x` -> `model.decoder.x`.
    """
    if name.endswith(".encoder_layer_scalar"):
        return "model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")
    return "model.decoder." + name


def save_checkpoint(
    model: DiffusionGemma, template: Path, out: Path, dtype: torch.dtype = torch.float32
) -> None:
    """Write `model`'s weights to `out` under checkpoint names, with `template`'s other files and tensors.

    Tensors of `template/model.safetensors` that `model` does not hold (the vision tower) are copied
    unchanged; generation_config.json is copied only if `out` has none (it holds tuned settings).
    """
    out.mkdir(parents=True, exist_ok=True)
    ours = {
        checkpoint_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
    }
    with safe_open(str(template / WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    unknown = sorted(set(ours) - set(tensors))
    if unknown:
        raise KeyError(f"{unknown[:3]} are not in the template checkpoint {template}")
    tensors |= ours
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(out / WEIGHTS)
    if template.resolve() != out.resolve():
        for name in COPIED_FILES:
            shutil.copy(template / name, out / name)
        if not (out / "generation_config.json").is_file():
            shutil.copy(template / "generation_config.json", out / "generation_config.json")
