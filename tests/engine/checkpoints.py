"""Tiny random DiffusionGemma checkpoints saved by transformers itself, for parity tests.

Every 1-D weight is moved away from 1 and the encoder and decoder `layer_scalar`s differ, so that
bugs like a `(1 + w)` norm or the wrong mode's scalar change the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from engine.config import ModelConfig
from recipes.char_tokenizer import save_char_tokenizer
from recipes.reference_config import text_only_config

VOCAB = 128
CANVAS = 16
WINDOW = 8

TEXT: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=WINDOW,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=24,
    final_logit_softcapping=30.0,
    max_position_embeddings=512,
    use_bidirectional_attention="vision",
    initializer_range=0.05,
)


def reference_config(**text_overrides: Any) -> DiffusionGemmaConfig:
    config: DiffusionGemmaConfig = text_only_config(TEXT | text_overrides, CANVAS)
    return config


def _perturb(model: DiffusionGemmaForBlockDiffusion, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            elif "vision" not in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        for i, layer in enumerate(model.model.decoder.layers):
            layer.layer_scalar.fill_(0.6 + 0.1 * i)
        for i, layer in enumerate(model.model.encoder.language_model.layers):
            layer.layer_scalar.fill_(1.4 - 0.1 * i)


def save_reference(
    path: Path, seed: int = 0, max_shard_size: str | None = None, **text_overrides: Any
) -> DiffusionGemmaForBlockDiffusion:
    """Save a perturbed random model at `path` and return the reference reloaded from disk (fp32, eval)."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(reference_config(**text_overrides)).eval()
    _perturb(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    return reloaded


def rewrite_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def save_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A character-level tokenizer (specials 0-4 as Gemma's, then printable ASCII) with a chat template."""
    names = SPECIAL_TOKENS + [chr(c) for c in range(32, 127)]
    names += [f"<unused{i}>" for i in range(len(names), vocab_size)]
    save_char_tokenizer(path, names, SPECIAL_TOKENS, CHAT_TEMPLATE)


def save_servable(path: Path, seed: int = 0) -> Path:
    """A tiny perturbed checkpoint with the char-level tokenizer: everything a server needs."""
    save_reference(path, seed=seed)
    save_tokenizer(path)
    return path


def tiny_model_config(**text_overrides: Any) -> ModelConfig:
    """Our `ModelConfig` of the tiny checkpoint's config (no files written)."""
    data = reference_config(**text_overrides).to_dict()
    return ModelConfig.from_hf(data | {"architectures": ["DiffusionGemmaForBlockDiffusion"]})
