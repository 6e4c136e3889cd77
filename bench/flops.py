"""Analytic parameter and FLOP counts of a DiffusionGemma denoise forward, from our `ModelConfig`.

Only matmuls count: 2 FLOPs per weight per token for the linear layers a token goes through (attention
projections, dense MLP, router, its top-k experts, the tied LM head), plus QK^T and PV over the keys a
canvas sees. Norms, RoPE, softmax, gelu and the embedding lookup are left out: they are memory-bound
and small next to the matmuls.
"""

from __future__ import annotations

from engine.config import LayerSpec, ModelConfig


def layer_linear_params(config: ModelConfig, spec: LayerSpec) -> tuple[int, int]:
    """(total, active per token) matmul weights of one layer: attention, dense MLP, router, experts."""
    hidden, heads = config.hidden_size, config.num_heads
    kv_width = spec.num_kv_heads * spec.head_dim
    attention = 2 * hidden * heads * spec.head_dim + hidden * kv_width * (2 if spec.has_v_proj else 1)
    dense_and_router = 3 * hidden * config.intermediate_size + hidden * config.num_experts
    expert = 3 * hidden * config.moe_intermediate_size
    shared = attention + dense_and_router
    return shared + config.num_experts * expert, shared + config.top_k_experts * expert


def active_params_per_token(config: ModelConfig) -> int:
    """Matmul weights one canvas token goes through: every layer's active weights plus the LM head."""
    trunk = sum(layer_linear_params(config, spec)[1] for spec in config.layers)
    return trunk + config.vocab_size * config.hidden_size


def attention_flops(config: ModelConfig, spec: LayerSpec, prompt_len: int) -> int:
    """QK^T and PV of one canvas on one layer: the canvas sees the visible cache plus itself.

    Example: sliding window 512, prompt 128, canvas 256 -> kv length 128 + 256 = 384.
    """
    cached = prompt_len if spec.kind == "full" else min(prompt_len, config.sliding_window - 1)
    kv_len = cached + config.canvas_length
    return 2 * 2 * config.num_heads * spec.head_dim * config.canvas_length * kv_len


def forward_flops(config: ModelConfig, num_canvases: int, prompt_len: int) -> float:
    linear = 2 * active_params_per_token(config) * config.canvas_length
    attention = sum(attention_flops(config, spec, prompt_len) for spec in config.layers)
    return float(num_canvases * (linear + attention))
