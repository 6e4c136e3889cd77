"""Where a PEFT LoRA tensor lands in our model, and what our model offers to adapt.

transformers' DiffusionGemma has an encoder tree (`model.encoder.language_model.layers.N...`) and a
decoder tree (`model.decoder.layers.N...`, `model.decoder.self_conditioning...`) whose base weights
are tied; ours has one tree (`layers.N...`, `self_conditioning...`). A PEFT module name therefore maps
to one of our modules and a side: `ENCODER` (its delta applies on causal passes) or `DECODER`
(denoise passes).

`model_targets(model)` lists what an adapter may target: every `Linear` (attention q/k/v/o, the
dense MLP, the router's projection, the self-conditioning MLP) by module name, and each layer's
unquantized experts by parameter name (`layers.N.experts.gate_up_proj`, `...down_proj`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.layers import Experts, Linear
from engine.model.methods.plain import LoopedExperts

ENCODER = 0
"""The side of causal passes (prompt chunks, canvas commits): the reference's encoder."""
DECODER = 1
"""The side of denoise passes: the reference's decoder."""
SIDES = (ENCODER, DECODER)

_ENCODER_PREFIX = "model.encoder.language_model."
_DECODER_PREFIX = "model.decoder."
_SIDE_ONLY_DECODER = re.compile(r"^self_conditioning\.")


@dataclass(frozen=True)
class LinearTarget:
    """A projection x (..., in) -> (..., out); its LoRA is A (r, in), B (out, r)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class ExpertsTarget:
    """One stacked expert weight (E, out, in): `gate_up_proj` (E, 2I, H) or `down_proj` (E, H, I);
    its LoRA is A (E, r, in), B (E, out, r) per expert."""

    num_experts: int
    in_features: int
    out_features: int


Target = LinearTarget | ExpertsTarget


def our_target(peft_module: str) -> tuple[str, int] | None:
    """A PEFT module name (the `base_model.model.` prefix and `base_layer.` nesting removed) -> our
    module name and side; None when it is no part of the text trunk we serve.

    Examples: `model.encoder.language_model.layers.3.mlp.up_proj` -> (`layers.3.mlp.up_proj`, ENCODER);
    `model.decoder.self_conditioning.up_proj` -> (`self_conditioning.up_proj`, DECODER).
    """
    if peft_module.startswith(_ENCODER_PREFIX):
        name = peft_module.removeprefix(_ENCODER_PREFIX)
        return (name, ENCODER) if name.startswith("layers.") else None
    if peft_module.startswith(_DECODER_PREFIX):
        name = peft_module.removeprefix(_DECODER_PREFIX)
        return (name, DECODER) if name.startswith(("layers.", "self_conditioning.")) else None
    return None


def model_targets(model: DiffusionGemma) -> dict[str, Target]:
    """Our target name -> its shape: every `Linear` module, and the two weights of each `Experts`
    whose method is plain (quantized experts take no LoRA)."""
    targets: dict[str, Target] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            targets[name] = LinearTarget(module.in_features, module.out_features)
        elif isinstance(module, Experts) and isinstance(module.method, LoopedExperts):
            config = model.config
            num, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
            targets[f"{name}.gate_up_proj"] = ExpertsTarget(num, hidden, 2 * inter)
            targets[f"{name}.down_proj"] = ExpertsTarget(num, inter, hidden)
    return targets


def decoder_only(name: str) -> bool:
    """Modules that only ever see denoise tokens (the self-conditioning MLP)."""
    return _SIDE_ONLY_DECODER.match(name) is not None
