"""How close to the matmul peak a denoise forward can get: its own matmuls, timed alone at their shapes.

`bench/forward.py` reports a forward's analytic FLOPs over its wall time as a fraction of the machine's
2048^3 `torch.mm` rate. That peak is for one large square matmul; a forward's matmuls are smaller
and thinner (K = hidden 512 on the bench model, a few hundred tokens per expert). This script lists
the matmuls of one denoise forward of N canvases exactly as `bench/flops.py` counts them (per layer:
q, k, v, o projections, dense gate / up / down, router, each expert's gate_up and down over its
T * k / E tokens, QK^T and PV per canvas and head; then the tied LM head per canvas), times each
shape alone with `torch.mm` / `torch.bmm` in the model dtype (fastest of `--reps`, inputs already in
memory), and adds them up. That sum is the time of a forward that did nothing but its matmuls, at the
speed they reach alone: the forward's FLOPs over it is the highest fraction of the peak this model's
forward can reach on this machine without merging matmuls into larger ones.

Memory is the other bound. A forward reads every weight once (at 4 canvases every expert gets tokens)
and, as `bench/forward.py` defines it, writes each canvas's raw logits in the model dtype, reads them
back and writes the softcapped fp32 logits. `memory_floor` adds those bytes up and divides them by the
machine's measured copy bandwidth (a 256 MiB fp32 `copy_`, read plus write bytes): no forward of this
definition moves its data faster, however its kernels are fused.

    python bench/matmul_bound.py --canvases 4 16 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, start
from bench.flops import forward_flops
from bench.forward import CANVAS_LENGTH, DTYPES, FULL_TEXT
from bench.timing import matmul_gflops, time_interleaved
from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from recipes.reference_config import text_only_config


@dataclass(frozen=True)
class Shape:
    """`batch` independent (m, k) x (k, n) products (batch 1: one `torch.mm`)."""

    m: int
    k: int
    n: int
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def bench_config() -> ModelConfig:
    """`bench/forward.py`'s model as our `ModelConfig`."""
    hf = text_only_config(FULL_TEXT, CANVAS_LENGTH).to_dict()
    return ModelConfig.from_hf(hf | {"architectures": list(SUPPORTED_ARCHITECTURES)})


def forward_shapes(config: ModelConfig, num_canvases: int, prompt_len: int) -> Counter[Shape]:
    """The matmuls of one denoise forward (first step), with how many times each shape runs."""
    hidden, heads, canvas = config.hidden_size, config.num_heads, config.canvas_length
    tokens = num_canvases * canvas
    per_expert = max(1, tokens * config.top_k_experts // config.num_experts)
    shapes: Counter[Shape] = Counter()
    for spec in config.layers:
        width, kv_width = heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        shapes[Shape(tokens, hidden, width)] += 1  # q
        shapes[Shape(tokens, hidden, kv_width)] += 2 if spec.has_v_proj else 1  # k (and v)
        shapes[Shape(tokens, width, hidden)] += 1  # o
        shapes[Shape(tokens, hidden, config.intermediate_size)] += 2  # dense gate, up
        shapes[Shape(tokens, config.intermediate_size, hidden)] += 1  # dense down
        shapes[Shape(tokens, hidden, config.num_experts)] += 1  # router
        shapes[Shape(per_expert, hidden, 2 * config.moe_intermediate_size)] += config.num_experts
        shapes[Shape(per_expert, config.moe_intermediate_size, hidden)] += config.num_experts
        cached = prompt_len if spec.kind == "full" else min(prompt_len, config.sliding_window - 1)
        keys = cached + canvas
        shapes[Shape(canvas, spec.head_dim, keys, num_canvases * heads)] += 1  # QK^T
        shapes[Shape(canvas, keys, spec.head_dim, num_canvases * heads)] += 1  # PV
    shapes[Shape(canvas, hidden, config.vocab_size)] += num_canvases  # LM head, canvas by canvas
    return shapes


def shape_seconds(shape: Shape, dtype: torch.dtype, reps: int) -> float:
    """Fastest of `reps` runs of the product alone."""
    a = torch.randn(shape.batch, shape.m, shape.k).to(dtype)
    b = torch.randn(shape.batch, shape.k, shape.n).to(dtype)
    if shape.batch == 1:
        a2, b2 = a[0], b[0]
        (timing,) = time_interleaved([lambda: torch.mm(a2, b2)], warmup=2, reps=reps)
    else:
        (timing,) = time_interleaved([lambda: torch.bmm(a, b)], warmup=2, reps=reps)
    return min(timing.wall)


COPY_BYTES = 256 << 20


def copy_bandwidth(reps: int) -> float:
    """Bytes per second of a large fp32 `copy_` (read plus write), fastest of `reps`."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    (timing,) = time_interleaved([lambda: dst.copy_(src)], warmup=1, reps=reps)
    return 2 * COPY_BYTES / min(timing.wall)


def memory_floor(config: ModelConfig, num_canvases: int, dtype: torch.dtype) -> int:
    """Bytes one forward must move at least: every weight once, and the logits' three passes (raw
    written, raw read, fp32 written) of `bench/forward.py`'s output."""
    width = torch.finfo(dtype).bits // 8
    hidden, vocab = config.hidden_size, config.vocab_size
    weights = vocab * hidden  # the tied embedding / LM head
    for spec in config.layers:
        q, kv = config.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        weights += hidden * (q + kv * (2 if spec.has_v_proj else 1)) + q * hidden  # q, k, (v), o
        weights += 3 * hidden * config.intermediate_size + hidden * config.num_experts  # dense MLP, router
        weights += 3 * config.num_experts * hidden * config.moe_intermediate_size  # experts
    logits = num_canvases * config.canvas_length * vocab
    return weights * width + logits * (2 * width + 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--canvases", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    start(args.threads)
    dtype = DTYPES[args.dtype]
    peak = matmul_gflops(dtype, 2048)
    print(f"matmul peak: {peak:.1f} GFLOP/s (2048^3 {args.dtype} torch.mm, fastest of 10)")
    config = bench_config()
    bandwidth = copy_bandwidth(args.reps)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (256 MiB fp32 copy_, read + write, fastest)")
    for num_canvases in args.canvases:
        shapes = forward_shapes(config, num_canvases, args.prompt_len)
        rows = [(shape, count, shape_seconds(shape, dtype, args.reps)) for shape, count in shapes.items()]
        total_s = sum(count * seconds for _, count, seconds in rows)
        flops = forward_flops(config, num_canvases, args.prompt_len)
        counted = sum(shape.flops * count for shape, count, _ in rows)
        print(f"\n{num_canvases} canvases: {len(rows)} shapes, {counted / 1e9:.1f} GFLOP ({flops / 1e9:.1f})")
        print(f"{'batch x (m, k) x (k, n)':>28}  runs  ms each  GFLOP/s  peak  share")
        for shape, count, seconds in sorted(rows, key=lambda r: -r[1] * r[2]):
            rate = shape.flops / seconds / 1e9
            label = f"{shape.batch} x ({shape.m}, {shape.k}) x ({shape.k}, {shape.n})"
            print(
                f"{label:>28} {count:>5} {seconds * 1e3:>8.3f} {rate:>8.0f} {rate / peak:>5.0%} "
                f"{count * seconds / total_s:>6.1%}"
            )
        bound = flops / total_s / 1e9
        print(
            f"matmuls alone: {total_s * 1e3:.1f} ms -> {bound:.0f} GFLOP/s = {bound / peak:.0%} of the peak "
            f"(the highest fraction a forward of these matmuls reaches here)"
        )
        moved = memory_floor(config, num_canvases, dtype)
        memory_s = moved / bandwidth
        print(
            f"memory floor: {moved / 1e6:.0f} MB -> {memory_s * 1e3:.1f} ms; with the matmuls alone: "
            f"{flops / max(total_s, memory_s) / 1e9 / peak:.0%} of the peak if they overlap fully, "
            f"{flops / (total_s + memory_s) / 1e9 / peak:.0%} if not"
        )
    print(f"load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
