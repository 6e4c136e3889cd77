"""A lower bound on the bench model's bf16 denoise forward: its unavoidable parts, each timed alone.

What `bench/forward.py` times is the trunk plus softcapped fp32 logits of every canvas token. This
times, on the same shapes and with nothing else around them, the parts no implementation can skip:
- every matmul of the trunk at its real shape (the q/k/v/o projections, the dense MLP with gate and up
  as one matmul, the router, each expert's two matmuls on its share of the rows, routed uniformly),
  each the faster of `F.linear` and oneDNN's prepacked weight, weights hot in cache;
- the attention (SDPA's flash kernel) of every layer over the prompt and the canvas;
- the LM head per canvas (prepacked where faster);
- writing the fp32 logits: one cast of the bf16 raw logits into a preallocated fp32 buffer (the least
  any soft-cap must do), and the soft-cap table's lookup (what the compiled engine does).
Their sum is the floor: the forward at that time would reach `floor %` of the matmul peak, and the
issue's 50% target leaves `budget - floor` for everything else (norms, RoPE, GELU, routing, the gather
of expert rows, residuals, dispatch, and the matmuls' loss to cold weights in the real forward).

    python bench/forward_floor.py --threads 2            # 4 and 16 canvases, about a minute
    python bench/forward_floor.py --quick --canvases 1   # smoke check
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import forward
from bench.common import load_average, start
from bench.flops import forward_flops
from bench.timing import matmul_gflops, median_ms
from engine.config import LayerSpec, ModelConfig
from engine.kernels.packed_linear import pack_weight, packed_linear, packs
from engine.kernels.softcap_table import build_table, table_softcap

BF16 = torch.bfloat16
PROMPT_LEN = 128
TARGET = 0.5


@dataclass
class Floor:
    """Milliseconds of each unavoidable part of one forward of N canvases."""

    matmuls: float
    attention: float
    head: float
    cast: float
    lookup: float

    @property
    def total(self) -> float:
        return self.matmuls + self.attention + self.head + min(self.cast, self.lookup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The bench model's bf16 forward: a floor from its parts.")
    parser.add_argument("--canvases", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=9, help="timed calls of each part (median)")
    parser.add_argument("--quick", action="store_true", help="the quick config, a smoke check")
    return parser.parse_args(argv)


def matmul_ms(rows: int, inner: int, outer: int, reps: int) -> float:
    """[rows, inner] @ [inner, outer] in bf16: the faster of F.linear and the prepacked weight."""
    x = torch.randn(rows, inner).to(BF16)
    weight = (torch.randn(outer, inner) * 0.05).to(BF16)
    plain = median_ms([lambda: F.linear(x, weight)], reps)[0]
    if not packs(weight):
        return plain
    packed = pack_weight(weight)
    return min(plain, median_ms([lambda: packed_linear(x, packed)], reps)[0])


def layer_matmuls_ms(config: ModelConfig, spec: LayerSpec, tokens: int, reps: int) -> float:
    hidden, heads, inter = config.hidden_size, config.num_heads, config.intermediate_size
    kv_width = spec.num_kv_heads * spec.head_dim
    rows_per_expert = max(1, tokens * config.top_k_experts // config.num_experts)
    attention = matmul_ms(tokens, hidden, heads * spec.head_dim, reps) * 2  # q and o (same flops)
    attention += matmul_ms(tokens, hidden, kv_width, reps) * (2 if spec.has_v_proj else 1)
    dense = matmul_ms(tokens, hidden, 2 * inter, reps) + matmul_ms(tokens, inter, hidden, reps)
    router = matmul_ms(tokens, hidden, config.num_experts, reps)
    moe_inter = config.moe_intermediate_size
    expert = matmul_ms(rows_per_expert, hidden, 2 * moe_inter, reps) + matmul_ms(
        rows_per_expert, moe_inter, hidden, reps
    )
    return attention + dense + router + config.num_experts * expert


def attention_ms(config: ModelConfig, spec: LayerSpec, canvases: int, reps: int) -> float:
    canvas = config.canvas_length
    q = torch.randn(canvases, config.num_heads, canvas, spec.head_dim).to(BF16)
    k = torch.randn(canvases, spec.num_kv_heads, PROMPT_LEN + canvas, spec.head_dim).to(BF16)
    v = torch.randn_like(k)
    return median_ms([lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)], reps)[0]


def floor_of(config: ModelConfig, canvases: int, reps: int) -> Floor:
    tokens, canvas, vocab = canvases * config.canvas_length, config.canvas_length, config.vocab_size
    by_spec: dict[LayerSpec, tuple[float, float]] = {}
    for spec in set(config.layers):
        by_spec[spec] = (
            layer_matmuls_ms(config, spec, tokens, reps),
            attention_ms(config, spec, canvases, reps),
        )
    raw = (torch.randn(canvas, vocab) * 20).to(BF16)
    out = torch.empty(canvas, vocab)
    assert config.final_logit_softcapping is not None, "the bench model soft-caps its logits"
    table = build_table(config.final_logit_softcapping)
    return Floor(
        matmuls=sum(by_spec[spec][0] for spec in config.layers),
        attention=sum(by_spec[spec][1] for spec in config.layers),
        head=canvases * matmul_ms(canvas, config.hidden_size, vocab, reps),
        cast=canvases * median_ms([lambda: out.copy_(raw)], reps)[0],
        lookup=canvases * median_ms([lambda: table_softcap(raw, table)], reps)[0],
    )


def report(config: ModelConfig, canvases: int, floor: Floor, peak: float) -> str:
    gflop = forward_flops(config, canvases, PROMPT_LEN) / 1e9
    budget = gflop / (TARGET * peak) * 1e3
    of_peak = gflop / floor.total * 1e3 / peak
    return (
        f"{canvases:>8} | {floor.matmuls:8.2f} | {floor.attention:6.2f} | {floor.head:6.2f} | "
        f"{floor.cast:6.2f} | {floor.lookup:6.2f} | {floor.total:7.2f} | {of_peak:6.0%} | "
        f"{budget:8.1f} | {budget - floor.total:9.1f}"
    )


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args.threads)
    peak = matmul_gflops(BF16, 1024 if args.quick else 2048)
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s; {TARGET:.0%} of it is the budget", flush=True)
    config = forward.bench_model(args.quick, BF16).config
    print(
        f"{'canvases':>8} | {'matmuls':>8} | {'attn':>6} | {'head':>6} | {'cast':>6} | {'lookup':>6} | "
        f"{'floor':>7} | {'of peak':>6} | {'budget':>8} | {'left over':>9}"
    )
    for canvases in args.canvases:
        print(report(config, canvases, floor_of(config, canvases, args.reps), peak), flush=True)
    print(
        "ms per forward; floor = matmuls (trunk, isolated) + attention + head + min(cast, lookup); "
        f"budget = the forward's FLOPs at {TARGET:.0%} of the peak; load average {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
