"""LoRA adapters made with PEFT on tiny random DiffusionGemma checkpoints, and their reference models.

transformers ties the encoder's and the decoder's base weights (one Parameter object), so PEFT's
`merge_and_unload` would add both sides' deltas into that one weight. `make_adapter` unties them
before wrapping, so the merged reference keeps the faithful semantics (the encoder's LoRA on the
encoder, the decoder's on the decoder), the same the unmerged PEFT model computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import DiffusionGemmaForBlockDiffusion

LINEARS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
EVERY_LINEAR = rf"model\.(encoder\.language_model|decoder)\..*\.({LINEARS}|router\.proj)"
"""Every text-trunk linear on both sides (the vision tower's q_proj etc. stay out)."""
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def load_reference(base: Path) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion.from_pretrained(base, dtype=torch.float32).eval()


def untie_encoder(model: DiffusionGemmaForBlockDiffusion) -> None:
    """Give the encoder's text layers their own copies of the weights they share with the decoder."""
    for layer in model.model.encoder.language_model.layers:
        for module in layer.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def make_adapter(
    base: Path, out: Path, seed: int, **lora: Any
) -> tuple[DiffusionGemmaForBlockDiffusion, DiffusionGemmaForBlockDiffusion]:
    """Save a PEFT adapter with random nonzero A and B at `out`; return (the PEFT model unmerged, the
    merged model) as transformers references (fp32, eval)."""
    model = load_reference(base)
    untie_encoder(model)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(0.15 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    unmerged = peft_model.base_model.model.eval()
    merged_source = load_reference(base)
    untie_encoder(merged_source)
    merged = PeftModel.from_pretrained(merged_source, out).merge_and_unload().eval()
    return unmerged, merged
