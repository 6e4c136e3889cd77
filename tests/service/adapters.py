"""PEFT LoRA adapters for the tiny test checkpoint, made by peft itself (as users make theirs)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DiffusionGemmaForBlockDiffusion

ATTENTION = r".*(language_model|decoder)\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
"""q_proj and v_proj of the text layers, encoder and decoder copies (the vision tower's are no Linear)."""


def save_adapter(base_dir: Path, out: Path, seed: int, rank: int = 4, targets: str = ATTENTION) -> Path:
    """A random (non-zero) LoRA adapter on the checkpoint at `base_dir`, saved by peft at `out`."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # B starts random too with init_lora_weights=False; make the delta clearly felt
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(out)
    return out
