"""Denoise-forward throughput: our engine against the transformers reference, on one checkpoint.

What it measures: one denoise forward (decoder mode, first step, so no self-conditioning input) of N
canvases of `canvas_length` tokens, each reading its own request's prompt from an already-prefilled KV
cache, followed by the tied LM head (softcapped fp32 logits of every canvas token). Ours is
`DiffusionGemma(batch, caches)` over one flat batch with paged caches, then `logits_for` per canvas;
the reference is `DiffusionGemmaForBlockDiffusion(decoder_input_ids=[N, C], past_key_values=cache)` with
a batched `DynamicCache` prefilled by its encoder. Both load the same random checkpoint (about 100M
parameters with the real model's proportions: 5 sliding : 1 full layers, K = V full layers with their
own head dim and KV heads, a 16-expert top-4 MoE beside the dense MLP, canvas 256) and get the same
inputs; their logits are compared so the timing compares equal work.

Each case times `--reps` forwards of each side after `--warmup` untimed ones, alternating ours and the
reference so that other load hits both alike, and reports the median and fastest wall time, the
process CPU time, canvas tokens per second and the achieved GFLOP/s against the machine's own measured
`torch.mm` rate. On a shared machine use `--threads 1`: two OpenMP threads on two busy cores stall at
every barrier and the timings swing by several times. The FLOP
model counts 2 x active matmul parameters per canvas token (attention projections, dense MLP, router,
top-k experts, LM head) plus QK^T and PV over the visible cache and the canvas on every layer; the
same count is the numerator for both sides (the reference also runs the self-conditioning MLP on
zeros, which is not counted).

Run: `make bench` (= `python bench/forward.py`), or e.g.
    python bench/forward.py --canvases 1 4 16 --reps 5 --threads 1 --json /tmp/forward.json
    python bench/forward.py --quick --canvases 1 --reps 1      # smoke check, a few seconds
    python bench/forward.py --dtype bf16 --profile 4            # top ops of one 4-canvas forward
    python bench/forward.py --dtype bf16 --canvases 4 16 --compile   # ours with the server's --compile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, machine_header, save_random_checkpoint
from bench.flops import active_params_per_token, forward_flops
from bench.timing import Timings, matmul_gflops, time_interleaved, top_ops
from engine.attention.types import LayerCache, Segment
from engine.config import ModelConfig
from engine.kv_cache import KVCacheManager
from engine.model.cache_tensors import allocate_layer_caches, cache_groups
from engine.model.compiled import compile_layers
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from engine.model.loader import load_checkpoint
from engine.sampler import LMHead, logits_for

SEED = 0
BLOCK_SIZE = 16
CANVAS_LENGTH = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# About 100M parameters (about 50M active per token), shaped like the released 26B-A4B model.
FULL_TEXT: dict[str, Any] = dict(
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=6,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    sliding_window=512,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=512,
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
    use_bidirectional_attention="vision",
)
# A few million parameters for the smoke check; the window (64) is shorter than the prompt.
QUICK_TEXT: dict[str, Any] = FULL_TEXT | dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    sliding_window=64,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=128,
)


@dataclass
class Row:
    """One case: N canvases per forward, both implementations."""

    canvases: int
    ours_ms: float
    """Median over the timed forwards; `*_best_ms` is the fastest (less sensitive to other load)."""
    ours_best_ms: float
    ours_cpu_ms: float
    """Median CPU time of the process (all threads) per forward; about threads x wall on an idle machine."""
    ours_tokens_per_s: float
    ref_ms: float
    ref_best_ms: float
    ref_cpu_ms: float
    ref_tokens_per_s: float
    ours_over_ref: float
    """Throughput ratio: > 1 means ours is faster."""
    max_abs_diff: float
    """max |ours - reference| over every logit of every canvas."""
    gflop: float
    ours_gflops: float
    ref_gflops: float
    ours_peak_fraction: float
    ref_peak_fraction: float


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Denoise-forward throughput, ours vs the reference.")
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16], help="canvases per forward")
    parser.add_argument("--prompt-len", type=int, default=128, help="prefilled prompt tokens per request")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per case")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per case (median reported)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n peak matmul")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, default=0, help="profile one forward of this many canvases")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny config for a smoke check")
    parser.add_argument(
        "--compile", action="store_true", help="ours through engine.model.compiled (--compile of the server)"
    )
    return parser.parse_args(argv)


def bench_model(quick: bool, dtype: torch.dtype) -> DiffusionGemma:
    """Our model of the bench checkpoint (`QUICK_TEXT` if quick, else `FULL_TEXT`), saved and loaded anew."""
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(Path(tmp), QUICK_TEXT if quick else FULL_TEXT, CANVAS_LENGTH, SEED)
        return load_checkpoint(Path(tmp), dtype=dtype, with_tokenizer=False).model


def load_both(path: Path, dtype: torch.dtype) -> tuple[DiffusionGemma, DiffusionGemmaForBlockDiffusion]:
    ours = load_checkpoint(path, dtype=dtype, with_tokenizer=False).model
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval()
    return ours, reference


# ---------------------------------------------------------------- the two forwards


def plan_cache(
    config: ModelConfig, num_requests: int, num_tokens: int
) -> tuple[dict[str, int], list[dict[str, list[int]]]]:
    """Blocks per cache group, and one request's tables per canvas covering positions [0, num_tokens)."""
    blocks = {kind: num_requests * math.ceil(num_tokens / BLOCK_SIZE) for kind in set(config.layer_kinds)}
    manager = KVCacheManager(cache_groups(config, blocks), BLOCK_SIZE)
    tables = []
    for i in range(num_requests):
        manager.allocate(f"r{i}", num_tokens)
        tables.append({g: manager.block_table(f"r{i}", g) for g in manager.group_names})
    return blocks, tables


def segment_batch(
    ids: Tensor, start: int, is_causal: bool, tables: list[dict[str, list[int]]]
) -> ForwardBatch:
    """A flat batch of one segment per row of ids (N, n), every segment at positions [start, start + n)."""
    num_rows, length = ids.shape
    return ForwardBatch(
        input_ids=ids.flatten(),  # (N * n,)
        positions=torch.arange(start, start + length).repeat(num_rows),
        segments=[Segment(length, start, is_causal, table) for table in tables],
    )


def prepare_ours(
    model: DiffusionGemma, prompts: Tensor, canvases: Tensor, compiled: bool = False
) -> tuple[ForwardBatch, list[LayerCache], LMHead]:
    """Prefill every prompt into fresh paged caches; return the denoise batch, the caches and the head."""
    config, weight = model.config, model.embed_tokens.weight
    num_requests, prompt_len = prompts.shape
    blocks, tables = plan_cache(config, num_requests, prompt_len + config.canvas_length)
    caches = allocate_layer_caches(config, blocks, BLOCK_SIZE, weight.dtype, weight.device)
    model(segment_batch(prompts, 0, True, tables), caches)
    head = LMHead(weight, config.final_logit_softcapping, model.embed_scale).prepacked()  # as the runner's
    head = head.with_table() if compiled else head
    return segment_batch(canvases, prompt_len, False, tables), caches, head


def our_forward(
    model: DiffusionGemma, batch: ForwardBatch, caches: list[LayerCache], head: LMHead
) -> list[Tensor]:
    """N tiles of (C, V) fp32 logits: the trunk over the flat batch, then the LM head canvas by canvas.

    The tiles are not stacked: the sampler consumes them one at a time, and a stack would time a copy.
    """
    hidden = model(batch, caches)  # (N * C, H)
    return [logits_for(tile, head) for tile in hidden.split(model.config.canvas_length)]


def prepare_reference(model: DiffusionGemmaForBlockDiffusion, prompts: Tensor) -> DynamicCache:
    """A batched DynamicCache holding every prompt, written by the reference encoder."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    positions = torch.arange(prompts.shape[1]).expand_as(prompts)
    model.model.encoder(input_ids=prompts, past_key_values=cache, position_ids=positions)
    return cache


def reference_forward(
    model: DiffusionGemmaForBlockDiffusion, canvases: Tensor, cache: DynamicCache
) -> Tensor:
    """(N, C, V) fp32 logits; the decoder reads the cache without writing it, so it can be reused."""
    out = model(decoder_input_ids=canvases, past_key_values=cache, self_conditioning_logits=None)
    return out.logits


# ---------------------------------------------------------------- one case


@torch.inference_mode()
def run_case(
    ours: DiffusionGemma,
    reference: DiffusionGemmaForBlockDiffusion,
    num_canvases: int,
    args: argparse.Namespace,
    peak_gflops: float,
) -> Row:
    config = ours.config
    gen = torch.Generator().manual_seed(SEED + num_canvases)
    prompts = torch.randint(3, config.vocab_size, (num_canvases, args.prompt_len), generator=gen)
    canvases = torch.randint(0, config.vocab_size, (num_canvases, config.canvas_length), generator=gen)
    batch, caches, head = prepare_ours(ours, prompts, canvases, compiled=args.compile)
    cache = prepare_reference(reference, prompts)

    def run_ours() -> list[Tensor]:
        return our_forward(ours, batch, caches, head)

    def run_reference() -> Tensor:
        return reference_forward(reference, canvases, cache)

    diff = float((torch.stack(run_ours()) - run_reference()).abs().max())
    print(f"agreement  canvases={num_canvases:<3d} max_abs_diff={diff:.3e}", flush=True)
    if args.profile == num_canvases:
        print(f"\nours, {num_canvases} canvases:\n{top_ops(run_ours)}")
        print(f"reference, {num_canvases} canvases:\n{top_ops(run_reference)}", flush=True)
    ours_times, ref_times = time_interleaved([run_ours, run_reference], args.warmup, args.reps)
    flops = forward_flops(config, num_canvases, args.prompt_len)
    return make_row(num_canvases, ours_times, ref_times, diff, flops, peak_gflops)


def make_row(
    num_canvases: int, ours_times: Timings, ref_times: Timings, diff: float, flops: float, peak: float
) -> Row:
    """Rates use the median wall times; GFLOP/s is the analytic FLOP count over the median wall time."""
    tokens = num_canvases * CANVAS_LENGTH
    ours_s, ref_s = statistics.median(ours_times.wall), statistics.median(ref_times.wall)
    ours_gflops, ref_gflops = flops / ours_s / 1e9, flops / ref_s / 1e9
    return Row(
        canvases=num_canvases,
        ours_ms=ours_s * 1e3,
        ours_best_ms=min(ours_times.wall) * 1e3,
        ours_cpu_ms=statistics.median(ours_times.cpu) * 1e3,
        ours_tokens_per_s=tokens / ours_s,
        ref_ms=ref_s * 1e3,
        ref_best_ms=min(ref_times.wall) * 1e3,
        ref_cpu_ms=statistics.median(ref_times.cpu) * 1e3,
        ref_tokens_per_s=tokens / ref_s,
        ours_over_ref=ref_s / ours_s,
        max_abs_diff=diff,
        gflop=flops / 1e9,
        ours_gflops=ours_gflops,
        ref_gflops=ref_gflops,
        ours_peak_fraction=ours_gflops / peak,
        ref_peak_fraction=ref_gflops / peak,
    )


# ---------------------------------------------------------------- report


def header(args: argparse.Namespace) -> dict[str, Any]:
    return machine_header() | {
        "dtype": args.dtype,
        "config": "quick" if args.quick else "full",
        "prompt_len": args.prompt_len,
        "canvas_length": CANVAS_LENGTH,
        "warmup": args.warmup,
        "reps": args.reps,
    }


def param_counts(model: DiffusionGemma) -> dict[str, int]:
    config = model.config
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "active_per_token": active_params_per_token(config),
        "embedding_and_lm_head": config.vocab_size * config.hidden_size,
    }


TABLE_HEAD = (
    f"{'canvases':>8} | {'ours ms (best) [cpu]':>22} | {'ours tok/s':>10} | {'ref ms (best) [cpu]':>22} | "
    f"{'ref tok/s':>10} | {'ours/ref':>8} | {'GFLOP':>6} | {'ours GFLOP/s':>14} | {'ref GFLOP/s':>14}"
)


def format_row(row: Row) -> str:
    ours_ms = f"{row.ours_ms:.0f} ({row.ours_best_ms:.0f}) [{row.ours_cpu_ms:.0f}]"
    ref_ms = f"{row.ref_ms:.0f} ({row.ref_best_ms:.0f}) [{row.ref_cpu_ms:.0f}]"
    ours = f"{row.ours_gflops:.1f} ({row.ours_peak_fraction:.0%})"
    ref = f"{row.ref_gflops:.1f} ({row.ref_peak_fraction:.0%})"
    return (
        f"{row.canvases:>8} | {ours_ms:>22} | {row.ours_tokens_per_s:>10.0f} | {ref_ms:>22} | "
        f"{row.ref_tokens_per_s:>10.0f} | {row.ours_over_ref:>7.2f}x | {row.gflop:>6.1f} | "
        f"{ours:>14} | {ref:>14}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = header(args)
    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    dtype = DTYPES[args.dtype]
    matmul_size = 1024 if args.quick else args.matmul_size
    peak = matmul_gflops(dtype, matmul_size)
    print(f"matmul peak: {peak:.1f} GFLOP/s ({matmul_size}^3 {args.dtype} torch.mm, fastest of 10)")
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(Path(tmp), QUICK_TEXT if args.quick else FULL_TEXT, CANVAS_LENGTH, SEED)
        ours, reference = load_both(Path(tmp), dtype)
    if args.compile:
        compile_layers(ours)  # compiled by the warm-up forwards
    counts = param_counts(ours)
    print(
        f"params: {counts['total'] / 1e6:.1f}M total, {counts['active_per_token'] / 1e6:.1f}M active per "
        f"token (of which LM head {counts['embedding_and_lm_head'] / 1e6:.1f}M); "
        f"reference attention: {reference.config._attn_implementation}",
        flush=True,
    )
    rows = [run_case(ours, reference, n, args, peak) for n in args.canvases]
    print("\n" + TABLE_HEAD + "\n" + "\n".join(format_row(r) for r in rows))
    print(
        "ms: median (fastest) [median process CPU ms, all threads] per forward incl. LM head; "
        "tok/s: canvas tokens per second at the median; "
        "ours/ref: throughput ratio; GFLOP/s: analytic FLOPs / median time (fraction of the matmul peak); "
        f"load average now {load_average()}"
    )
    if args.json:
        result = {
            "header": info,
            "matmul_peak_gflops": peak,
            "params": counts,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
