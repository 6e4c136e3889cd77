"""Frozen, validated configuration: the model's shape, the KV cache, and the diffusion defaults.

Nothing here imports torch. `ModelConfig.from_hf` reads a DiffusionGemma `config.json` (both the
`global_head_dim` / `num_global_key_value_heads` form and the serialised `per_layer_config` form);
`DiffusionDefaults.from_hf` reads `generation_config.json`, falling back to the values the reference
`DiffusionGemmaGenerationConfig._get_default_generation_params` uses for anything unset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

LayerKind = Literal["sliding", "full"]

SUPPORTED_ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)
_LAYER_KIND = {"sliding_attention": "sliding", "full_attention": "full"}


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a field or holds a value we cannot serve."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer kind.

    `rope_type` is "default" (all of `head_dim` rotates) or "proportional" (only the first
    `partial_rotary_factor * head_dim` dims rotate, with frequencies whose exponent is divided by the
    full head_dim; the rest pass through unchanged).
    """

    theta: float
    rope_type: Literal["default", "proportional"] = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    """Divides every inverse frequency (proportional RoPE only; 1.0 in released checkpoints)."""


@dataclass(frozen=True)
class LayerSpec:
    """Attention shape of one layer. Full layers have K = V (no v_proj)."""

    kind: LayerKind
    head_dim: int
    num_kv_heads: int
    rope: RopeSpec

    @property
    def has_v_proj(self) -> bool:
        return self.kind == "sliding"


@dataclass(frozen=True)
class ModelConfig:
    """The DiffusionGemma text trunk's shape. One instance describes both encoder and decoder modes."""

    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the dense MLP that runs beside the MoE on every layer, and of the self-conditioning MLP."""
    num_heads: int
    """Query heads per layer."""
    layers: tuple[LayerSpec, ...]
    """One attention shape per decoder layer, in order."""
    sliding_window: int
    """Causal window of sliding layers: a token sees itself and the `sliding_window - 1` before it."""
    num_experts: int
    """Experts of each layer's mixture of experts."""
    top_k_experts: int
    """Experts the router picks per token."""
    moe_intermediate_size: int
    """Width of one expert's MLP."""
    canvas_length: int
    """Tokens the model denoises together (one canvas), fixed at training."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    final_logit_softcapping: float | None = 30.0
    """Logits become cap * tanh(logits / cap); None: no cap."""
    hidden_activation: str = "gelu_pytorch_tanh"
    """MLP activation (only gelu_pytorch_tanh is supported)."""
    max_position_embeddings: int = 131_072
    """Positions the model was trained for; the default max_model_len."""
    pad_token_id: int | None = 0
    """Padding token id, if the tokenizer has one."""
    bos_token_id: int | None = 2
    """Beginning-of-sequence token id, if the tokenizer has one."""
    eos_token_ids: tuple[int, ...] = (1,)
    """Token ids that end a sequence (the default stop ids)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k_experts <= self.num_experts:
            raise ConfigError(
                f"top_k_experts={self.top_k_experts} must be in [1, num_experts={self.num_experts}]"
            )
        for i, layer in enumerate(self.layers):
            if self.num_heads % layer.num_kv_heads:
                raise ConfigError(
                    f"layer {i}: num_attention_heads={self.num_heads} is not a multiple of "
                    f"num_key_value_heads={layer.num_kv_heads}"
                )
        for kind in ("sliding", "full"):
            shapes = {(layer.head_dim, layer.rope) for layer in self.layers if layer.kind == kind}
            if len(shapes) > 1:
                raise ConfigError(f"{kind} layers must share one head_dim and RoPE; got {shapes}")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")
        if self.canvas_length < 1 or self.sliding_window < 2:
            raise ConfigError("canvas_length must be >= 1 and sliding_window >= 2")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(layer.kind for layer in self.layers)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a parsed DiffusionGemma `config.json` (top level with a `text_config`)."""
        architectures = config.get("architectures") or []
        if config.get("model_type") != "diffusion_gemma" or not set(architectures) & set(
            SUPPORTED_ARCHITECTURES
        ):
            raise ConfigError(
                f"unsupported architecture: model_type={config.get('model_type')!r}, "
                f"architectures={architectures}; canvas-serve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no text_config")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        eos = text.get("eos_token_id", config.get("eos_token_id", 1))
        return cls(
            vocab_size=_require(text, "vocab_size"),
            hidden_size=_require(text, "hidden_size"),
            intermediate_size=_require(text, "intermediate_size"),
            num_heads=_require(text, "num_attention_heads"),
            layers=_parse_layers(text),
            sliding_window=_require(text, "sliding_window"),
            num_experts=_require(text, "num_experts"),
            top_k_experts=_require(text, "top_k_experts"),
            moe_intermediate_size=_require(text, "moe_intermediate_size"),
            canvas_length=int(config.get("canvas_length") or 256),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
            max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
            pad_token_id=text.get("pad_token_id", 0),
            bos_token_id=text.get("bos_token_id", 2),
            eos_token_ids=_as_ids(eos),
        )


def _require(section: dict[str, Any], key: str) -> Any:
    if section.get(key) is None:
        raise ConfigError(f"config.json text_config is missing {key!r}")
    return section[key]


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _layer_types(text: dict[str, Any]) -> list[str]:
    """The reference's rule: given types, else 5 sliding : 1 full; the last layer is always full."""
    num_layers = int(_require(text, "num_hidden_layers"))
    types = list(text.get("layer_types") or [])
    if not types:
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    unknown = sorted(set(types) - set(_LAYER_KIND))
    if unknown:
        raise ConfigError(f"unsupported layer_types {unknown}; expected sliding_attention/full_attention")
    types[-1] = "full_attention"
    return types


def _rope_specs(text: dict[str, Any]) -> dict[str, RopeSpec]:
    params = text.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
    specs = {}
    for layer_type, p in params.items():
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            raise ConfigError(f"rope_type {rope_type!r} for {layer_type} is not supported")
        specs[layer_type] = RopeSpec(
            theta=float(p["rope_theta"]),
            rope_type=rope_type,
            partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
            factor=float(p.get("factor", 1.0)),
        )
        if rope_type == "default" and specs[layer_type].partial_rotary_factor != 1.0:
            raise ConfigError(f"default RoPE with partial_rotary_factor != 1 ({layer_type}) is not supported")
    return specs


def _layer_overrides(text: dict[str, Any], types: list[str]) -> dict[int, dict[str, int]]:
    """Per-layer head_dim / num_key_value_heads overrides, from either config form.

    Serialised form: `per_layer_config = {"5": {"head_dim": 512, "num_key_value_heads": 2}, ...}`
    (keys may also be layer types). Raw form: `global_head_dim` (default 512) and
    `num_global_key_value_heads` (default: keep `num_key_value_heads`) for every full layer.
    """
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        full: dict[str, int] = {"head_dim": int(text.get("global_head_dim", 512))}
        if text.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = int(text["num_global_key_value_heads"])
        return {i: full for i, t in enumerate(types) if t == "full_attention"}
    overrides: dict[int, dict[str, int]] = {}
    for key, values in per_layer.items():
        indices = [i for i, t in enumerate(types) if t == key] if key in _LAYER_KIND else [int(key)]
        for i in indices:
            overrides.setdefault(i, {}).update({k: int(v) for k, v in values.items()})
    return overrides


def _parse_layers(text: dict[str, Any]) -> tuple[LayerSpec, ...]:
    types = _layer_types(text)
    ropes = _rope_specs(text)
    overrides = _layer_overrides(text, types)
    base = {
        "head_dim": int(_require(text, "head_dim")),
        "num_key_value_heads": int(text["num_key_value_heads"]),
    }
    layers = []
    for i, layer_type in enumerate(types):
        shape = base | overrides.get(i, {})
        if layer_type not in ropes:
            raise ConfigError(f"rope_parameters has no entry for {layer_type}")
        layers.append(
            LayerSpec(
                kind=_LAYER_KIND[layer_type],  # type: ignore[arg-type]
                head_dim=shape["head_dim"],
                num_kv_heads=shape["num_key_value_heads"],
                rope=ropes[layer_type],
            )
        )
    return tuple(layers)


@dataclass(frozen=True)
class DiffusionDefaults:
    """Sampler defaults for requests that do not set them (from `generation_config.json`)."""

    max_denoising_steps: int = 48
    """Denoise steps a canvas takes at most before it is committed."""
    entropy_bound: float = 0.1
    """Acceptance: the lowest-entropy positions whose entropy sum, less its maximum, stays within it."""
    t_min: float = 0.4
    """Sampling temperature at the last step of the schedule."""
    t_max: float = 0.8
    """Sampling temperature at the first step of the schedule."""
    stability_threshold: int = 1
    """Early stop: the argmax must equal each of the last this-many argmaxes."""
    confidence_threshold: float = 0.005
    """Early stop also needs the canvas's mean entropy below this."""
    max_new_tokens: int = 256
    """Output tokens of a request that sets no max_tokens."""
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Token ids that end a request (cut from the output)."""

    @classmethod
    def from_hf(cls, generation: dict[str, Any], model: ModelConfig) -> DiffusionDefaults:
        """Values set in `generation_config.json` win; nulls and absent keys take the reference defaults."""
        sampler = generation.get("sampler_config") or {}
        eos = generation.get("eos_token_id")
        values = {
            "max_denoising_steps": generation.get("max_denoising_steps"),
            "entropy_bound": sampler.get("entropy_bound"),
            "t_min": generation.get("t_min"),
            "t_max": generation.get("t_max"),
            "stability_threshold": generation.get("stability_threshold"),
            "confidence_threshold": generation.get("confidence_threshold"),
            "max_new_tokens": generation.get("max_new_tokens"),
        }
        return cls(
            **{k: v for k, v in values.items() if v is not None},
            eos_token_ids=_as_ids(eos) if eos is not None else model.eos_token_ids,
        )
