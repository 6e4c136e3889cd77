"""A LoRA adapter on our model, in PEFT's format for transformers' DiffusionGemmaForBlockDiffusion.

`Adapter.attach` wraps the target projections of a (frozen) `DiffusionGemma` in `LoRALinear`s with an
encoder-side and a decoder-side delta (the self-conditioning MLP, decoder-only in transformers, only a
decoder-side one), and `passes` runs `encode_prompts` on the encoder side and `decode_canvases` on the
decoder side: the causal prompt pass is transformers' encoder, the denoise pass its decoder. With
`LoRASpec.experts` every layer's experts are wrapped too (`lora_experts.LoRAExperts`: deltas on both
3-D weights, in PEFT's `target_parameters` layout).

Files (`save` / `load`), as `PeftModel.save_pretrained` writes them:
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
  (out, r), where <module> is transformers' path, e.g. `model.encoder.language_model.layers.3.self_attn.
  q_proj` (encoder side) or `model.decoder.layers.3.self_attn.q_proj`, `model.decoder.self_conditioning.
  up_proj` (decoder side); an expert weight's pair is (E * r, in) and (out, E * r) under
  `<layer>.experts.base_layer` (gate_up_proj) or `<layer>.experts` (down_proj);
- `adapter_config.json`: `peft_type` LORA, `r`, `lora_alpha`, `use_rslora` (scaling alpha / sqrt(r),
  else alpha / r), and `target_modules` as one regular expression PEFT full-matches against module
  names, naming the text layers' projections only (a bare `q_proj` would also match the vision tower's),
  and `target_parameters` (the experts' weights, or none).
tests/recipes/test_lora.py checks that PEFT loading these files gives the logits `passes` gives.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.model.diffusion_gemma import DiffusionGemma
from recipes.sudoku.dense_forward import (
    EAGER,
    LayerForwards,
    Passes,
    PromptCache,
    decode_canvases,
    encode_prompts,
)
from recipes.sudoku.lora_experts import LoRAExperts, LoRAExpertWeight
from recipes.sudoku.lora_linear import ROLES, LoRALinear, Role, Side

LoRAModule = LoRALinear | LoRAExpertWeight
"""What holds one target's deltas: `lora_A` and `lora_B`, a parameter per side."""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
EXPERT_MODULES = {"gate_up_proj": "experts.base_layer", "down_proj": "experts"}
"""Where PEFT's nested wrappers put each expert weight's pair, relative to the layer."""
MLP = ("gate_proj", "up_proj", "down_proj")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and scaling rule (PEFT's), and which projections get deltas."""

    rank: int = 32
    alpha: float = 32.0
    use_rslora: bool = True
    attention: bool = True
    """q/k/v/o of every layer, both sides."""
    mlp: bool = True
    """The dense MLP's gate/up/down of every layer, both sides."""
    self_conditioning: bool = True
    """The self-conditioning MLP's gate/up/down (decoder side only: it runs only in the denoise pass)."""
    experts: bool = False
    """The MoE experts' gate_up_proj and down_proj of every layer, both sides (PEFT's
    `target_parameters`; `lora_experts.py`)."""

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def target_modules(self) -> str:
        """The regular expression PEFT full-matches against transformers' module names."""
        layer_parts = []
        if self.attention:
            layer_parts.append(rf"self_attn\.({'|'.join(ATTENTION)})")
        if self.mlp:
            layer_parts.append(rf"mlp\.({'|'.join(MLP)})")
        parts = []
        if layer_parts:
            parts.append(rf"model\.(encoder\.language_model|decoder)\.layers\.\d+\.({'|'.join(layer_parts)})")
        if self.self_conditioning:
            parts.append(rf"model\.decoder\.self_conditioning\.({'|'.join(MLP)})")
        if not parts:
            raise ValueError("LoRASpec targets no projection: enable attention, mlp or self_conditioning")
        return "|".join(parts)

    def target_parameters(self) -> list[str] | None:
        """PEFT's `target_parameters`: the experts' 3-D weights, gate_up_proj first (its wrapper is the
        inner one, `experts.base_layer`)."""
        return [f"experts.{name}" for name in EXPERT_WEIGHTS] if self.experts else None


def peft_module(name: str, role: Role) -> str:
    """Our module name and side -> transformers' module path.

    `layers.3.mlp.up_proj`, encoder -> `model.encoder.language_model.layers.3.mlp.up_proj`;
    decoder -> `model.decoder.layers.3.mlp.up_proj`; `self_conditioning.up_proj` (decoder only) ->
    `model.decoder.self_conditioning.up_proj`.
    """
    if role == "decoder":
        return f"model.decoder.{name}"
    if not name.startswith("layers."):
        raise ValueError(f"{name} has no encoder-side module in transformers (it runs only in the decoder)")
    return f"model.encoder.language_model.{name}"


def our_module(path: str) -> tuple[str, Role]:
    """Inverse of `peft_module`; a path outside the text layers and self-conditioning is an error."""
    for prefix, role in (("model.encoder.language_model.", "encoder"), ("model.decoder.", "decoder")):
        if path.startswith(prefix):
            name = path.removeprefix(prefix)
            if name.startswith("layers.") or (role == "decoder" and name.startswith("self_conditioning.")):
                return name, role  # type: ignore[return-value]
    raise ValueError(f"LoRA module {path} is not a text-layer or self-conditioning projection")


def _targets(model: DiffusionGemma, spec: LoRASpec) -> Iterator[tuple[str, tuple[Role, ...]]]:
    """(our module name, sides) of every projection `spec` targets that the model has."""
    for i, layer in enumerate(model.layers):
        names = [
            f"self_attn.{p}" for p in ATTENTION if spec.attention and getattr(layer.self_attn, p) is not None
        ]
        names += [f"mlp.{p}" for p in MLP if spec.mlp]
        for name in names:
            yield f"layers.{i}.{name}", ROLES
    if spec.self_conditioning:
        for p in MLP:
            yield f"self_conditioning.{p}", ("decoder",)


def _attach_experts(
    model: DiffusionGemma, spec: LoRASpec, side: Side, generator: torch.Generator
) -> dict[str, LoRAModule]:
    """Wrap every layer's experts in `LoRAExperts`; its two weights' deltas by PEFT's module names."""
    modules: dict[str, LoRAModule] = {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer.experts, LoRAExperts):
            raise ValueError(f"layers.{i}.experts already has a LoRA adapter attached")
        wrapped = LoRAExperts(layer.experts, spec.rank, spec.scaling, ROLES, side)
        wrapped.to(device=model.embed_tokens.weight.device)
        for weight_name, weight in (("gate_up_proj", wrapped.gate_up), ("down_proj", wrapped.down)):
            weight.reset(generator)
            modules[f"layers.{i}.{EXPERT_MODULES[weight_name]}"] = weight
        layer.experts = wrapped  # type: ignore[assignment]
    return modules


class Adapter:
    """The LoRA deltas attached to one model, by our module name (an expert weight's: PEFT's)."""

    def __init__(
        self, model: DiffusionGemma, spec: LoRASpec, side: Side, modules: dict[str, LoRAModule]
    ) -> None:
        self.model = model
        self.spec = spec
        self.side = side
        self.modules = modules

    @classmethod
    def attach(cls, model: DiffusionGemma, spec: LoRASpec, generator: torch.Generator) -> Adapter:
        """Freeze `model` and wrap its target projections (in place), deltas initialised as PEFT does."""
        model.requires_grad_(False)
        side = Side()
        modules: dict[str, LoRAModule] = {}
        for name, roles in _targets(model, spec):
            parent_name, attr = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter attached")
            wrapped = LoRALinear(
                base, base.in_features, base.out_features, spec.rank, spec.scaling, roles, side
            )
            wrapped.to(device=model.embed_tokens.weight.device)
            wrapped.reset(generator)
            setattr(parent, attr, wrapped)
            modules[name] = wrapped
        if spec.experts:
            modules |= _attach_experts(model, spec, side, generator)
        return cls(model, spec, side, modules)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for d in (m.lora_A, m.lora_B) for p in d.values()]

    @contextmanager
    def side_of(self, role: Role) -> Iterator[None]:
        """Run the wrapped projections with `role`'s deltas inside the block."""
        previous, self.side.role = self.side.role, role
        try:
            yield
        finally:
            self.side.role = previous

    def passes(self) -> Passes:
        """`encode_prompts` on the encoder side, `decode_canvases` on the decoder side."""

        def encode(model: DiffusionGemma, prompts: Tensor, forwards: LayerForwards = EAGER) -> PromptCache:
            with self.side_of("encoder"):
                return encode_prompts(model, prompts, forwards)

        def decode(
            model: DiffusionGemma,
            cache: PromptCache,
            canvases: Tensor,
            soft_embeds: Tensor | None = None,
            forwards: LayerForwards = EAGER,
        ) -> Tensor:
            with self.side_of("decoder"):
                return decode_canvases(model, cache, canvases, soft_embeds, forwards)

        return Passes(encode=encode, decode=decode)

    def state_dict(self) -> dict[str, Tensor]:
        """PEFT's tensors: `base_model.model.<transformers path>.lora_{A,B}.weight`."""
        out: dict[str, Tensor] = {}
        for name, module in self.modules.items():
            for role in module.lora_A:
                path = peft_module(name, role)  # type: ignore[arg-type]
                out[f"base_model.model.{path}.lora_A.weight"] = (
                    module.lora_A[role].detach().contiguous().clone()
                )
                out[f"base_model.model.{path}.lora_B.weight"] = (
                    module.lora_B[role].detach().contiguous().clone()
                )
        return out

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy PEFT tensors into the attached deltas; every delta must be given, with its shape."""
        expected = self.state_dict()
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors differ: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
            )
        for key, tensor in tensors.items():
            match = _KEY.fullmatch(key)
            assert match is not None
            name, role = our_module(match["module"])
            target = (self.modules[name].lora_A if match["ab"] == "A" else self.modules[name].lora_B)[role]
            if target.shape != tensor.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)

    def save(self, directory: Path, base_model: str) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / WEIGHTS), metadata={"format": "pt"})
        (directory / WEIGHTS).chmod(0o644)  # safetensors creates it 0600: other users' servers load it
        (directory / CONFIG).write_text(json.dumps(adapter_config(self.spec, base_model), indent=2) + "\n")


def adapter_config(spec: LoRASpec, base_model: str) -> dict[str, object]:
    """PEFT's LoraConfig fields for `spec` (the ones PEFT reads; the rest take its defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "target_modules": spec.target_modules(),
        "target_parameters": spec.target_parameters(),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def read_spec(directory: Path) -> LoRASpec:
    """The spec an adapter directory written by `Adapter.save` was made with."""
    config = json.loads((directory / CONFIG).read_text())
    pattern = config["target_modules"]
    return LoRASpec(
        rank=config["r"],
        alpha=config["lora_alpha"],
        use_rslora=config.get("use_rslora", False),
        attention="self_attn" in pattern,
        mlp=r"mlp\." in pattern,
        self_conditioning="self_conditioning" in pattern,
        experts=bool(config.get("target_parameters")),
    )


def load_adapter(model: DiffusionGemma, directory: Path) -> Adapter:
    """Attach the adapter saved in `directory` (by `Adapter.save`) to `model`."""
    adapter = Adapter.attach(model, read_spec(directory), torch.Generator().manual_seed(0))
    adapter.load_state_dict(load_file(str(directory / WEIGHTS)))
    return adapter
