"""Where one engine denoise step spends its time: per op and per part of a layer, by torch.profiler.

One step is what `ModelRunner.execute` does for N canvases already past their first step: the trunk
forward over N bidirectional canvas segments that read a prefilled prompt from the paged cache (with
the self-conditioning input), then the runner's sampler step (`step_canvases`: `denoise_step`, or
`packed_denoise_step` where it can: LM head, entropy, sampling, soft embedding) for
every canvas. Two models: the bench model of `bench/forward.py` (random init, about 100M parameters,
canvas 256, vocab 32768) and the shipped Sudoku model (`models/sudoku`, 8 layers of hidden 128,
canvas 82).

Parts are profiler ranges opened by forward hooks on the modules (`attn.qkv` = q/k/v projections,
norms and RoPE; `attn.core` = the backend's paged attention; `attn.o_proj`; `mlp` = dense MLP;
`router`; `experts`; `norm` = the layer's RMSNorms outside those; `self_cond` = the decoder input
block; `sampler` = `denoise_step`). Times are inclusive CPU time of the range, summed over layers.

    python bench/step_profile.py --model bench --dtype bf16 --canvases 4 --threads 1
    python bench/step_profile.py --model sudoku --dtype fp32 bf16 --canvases 1 4 16
    python bench/step_profile.py --ab --reps 7     # step time before/after issue 21's changes, interleaved
    python bench/step_profile.py --compile --model sudoku --dtype bf16 fp32 --reps 9   # eager vs --compile
    python bench/step_profile.py --compile --dense-experts --model sudoku --dtype bf16   # dense vs grouped
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, start
from bench.forward import DTYPES, bench_model, plan_cache, segment_batch
from bench.timing import matmul_gflops, time_interleaved
from engine import sampler
from engine.attention import reference
from engine.attention.base import BoundAttention
from engine.attention.selection import select_attention_backend
from engine.attention.types import LayerCache, Segment
from engine.model.cache_tensors import allocate_layer_caches
from engine.model.compiled import compile_layers
from engine.model.diffusion_gemma import Attention, DiffusionGemma
from engine.model.layers import Experts, GatedMLP, RMSNorm, Router, SelfConditioning, rms_norm_reference
from engine.model.loader import load_checkpoint
from engine.model.methods.plain import DenseExperts
from engine.packed_sampler import step_canvases
from engine.request import StepParams
from engine.sampler import LMHead, init_canvas

SUDOKU_DIR = Path(__file__).resolve().parents[1] / "models" / "sudoku"
PROMPT_LEN = {"bench": 128, "sudoku": 90}

PART_OF: list[tuple[type[nn.Module], str]] = [
    (SelfConditioning, "self_cond"),
    (GatedMLP, "mlp"),
    (Router, "router"),
    (Experts, "experts"),
    (RMSNorm, "norm"),
]


def load_model(name: str, dtype: torch.dtype) -> DiffusionGemma:
    if name == "sudoku":
        return load_checkpoint(SUDOKU_DIR, dtype=dtype, with_tokenizer=False).model
    return bench_model(quick=False, dtype=dtype)


def annotate(model: DiffusionGemma) -> None:
    """Open one profiler range per module call, named by its part (outermost part wins)."""
    depth: dict[int, int] = {}

    def wrap(module: nn.Module, part: str) -> None:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            inside = depth.get(0, 0)
            depth[0] = inside + 1
            try:
                if inside:
                    return original(*args, **kwargs)
                with record_function(f"part:{part}"):
                    return original(*args, **kwargs)
            finally:
                depth[0] = inside

        module.forward = forward  # type: ignore[method-assign]

    for module in model.modules():
        if isinstance(module, Attention):
            wrap_attention(module)
        for cls, part in PART_OF:
            if isinstance(module, cls):
                wrap(module, part)
                break


def wrap_attention(attn: Attention) -> None:
    project, output = attn.project, attn.output

    def ranged(fn: Callable[..., Tensor | tuple[Tensor, ...]], part: str) -> Callable[..., Any]:
        def inner(*args: Any) -> Any:
            with record_function(f"part:{part}"):
                return fn(*args)

        return inner

    attn.project = ranged(project, "attn.qkv")  # type: ignore[method-assign]
    attn.output = ranged(output, "attn.o_proj")  # type: ignore[method-assign]


@contextmanager
def profiled() -> Iterator[torch.profiler.profile]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield prof


def make_step(model: DiffusionGemma, name: str, n: int) -> Callable[[], None]:
    """One engine step of n canvases past their first step (prompts prefilled once, here)."""
    config = model.config
    weight = model.embed_tokens.weight
    prompt_len = PROMPT_LEN[name]
    canvas = config.canvas_length
    gen = torch.Generator().manual_seed(n)
    prompts = torch.randint(3, config.vocab_size, (n, prompt_len), generator=gen)
    blocks, tables = plan_cache(config, n, prompt_len + canvas)
    caches = allocate_layer_caches(config, blocks, 16, weight.dtype, weight.device)
    head = LMHead(weight, config.final_logit_softcapping, model.embed_scale)
    params = StepParams(max_steps=10**6, t_min=0.4, t_max=0.8, entropy_bound=0.1,
                        confidence_threshold=0.0, stability_threshold=1)  # fmt: skip
    states = [init_canvas(canvas, config.vocab_size, 1, torch.Generator().manual_seed(i)) for i in range(n)]
    backend = select_attention_backend(weight.device)
    with torch.inference_mode():
        model(segment_batch(prompts, 0, True, tables), caches)

        def step() -> None:
            batch = segment_batch(torch.stack([s.tokens for s in states]), prompt_len, False, tables)
            if states[0].self_cond is not None:
                batch.soft_embeds = torch.cat([s.self_cond for s in states if s.self_cond is not None])
            with record_function("part:prepare"):
                bound = backend.bind(batch.segments, caches)
            batch.attention = _Timed(bound)  # type: ignore[assignment]
            with record_function("part:trunk"):
                hidden = model(batch, caches)
            with record_function("part:sampler"):
                step_canvases(hidden, head, states, [params] * n)

        step()  # every canvas past its first step: self-conditioning on from now
    return torch.inference_mode()(step)


def one_case(model: DiffusionGemma, name: str, n: int, dtype_name: str, args: argparse.Namespace) -> None:
    step = make_step(model, name, n)
    if args.ab:
        return ab_case(step, name, n, dtype_name, args)
    for _ in range(args.warmup):
        step()
    walls = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profiled() as prof:
        step()
    walls.sort()
    median = walls[len(walls) // 2]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    parts = sorted(
        ((e.key[5:], e.cpu_time_total) for e in events if e.key.startswith("part:")), key=lambda kv: -kv[1]
    )
    print(
        f"\n== {name} {dtype_name} canvases={n}: step median {median * 1e3:.1f} ms "
        f"(fastest {walls[0] * 1e3:.1f}) over {args.reps}; profiled self total {total / 1e3:.1f} ms"
    )
    print("parts (inclusive ms, share of the profiled step):")
    step_total = next(t for k, t in parts if k == "trunk") + next(t for k, t in parts if k == "sampler")
    step_total += next(t for k, t in parts if k == "prepare")
    for key, t in parts:
        print(f"  {key:<12} {t / 1e3:9.2f}  {t / step_total:6.1%}")
    print("ops (self ms, share):")
    ops = sorted((e for e in events if not e.key.startswith("part:")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.top]:
        ms, share = e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total
        print(f"  {e.key:<36} {ms:9.2f}  {share:6.1%}  x{e.count}")
    print(f"  ops launched: {sum(e.count for e in ops)}", flush=True)


class _Timed:
    """A bound attention whose calls open the `attn.core` range."""

    def __init__(self, bound: BoundAttention[Any]) -> None:
        self.bound = bound

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cache: Any) -> Tensor:
        with record_function("part:attn.core"):
            return self.bound(q, k, v, cache)


@contextmanager
def before_issue_21() -> Iterator[None]:
    """The step as it was before issue 21: one SDPA call per canvas and layer, the sampler over whole
    canvases, RMSNorm as nine ops."""
    saved = reference.plan_group, sampler._tiled_canvas_stats, RMSNorm.forward

    def norm(self: RMSNorm, x: Tensor) -> Tensor:
        return rms_norm_reference(x, self.weight, self.eps)

    def per_segment(segments: list[Segment], cache: LayerCache) -> list[Any]:
        return [reference.plan_segment(s, cache) for s in segments]

    reference.plan_group, sampler._tiled_canvas_stats = per_segment, untiled_canvas_stats  # type: ignore[assignment]
    RMSNorm.forward = norm  # type: ignore[method-assign]
    try:
        yield
    finally:
        reference.plan_group, sampler._tiled_canvas_stats, RMSNorm.forward = saved  # type: ignore[method-assign]


def untiled_canvas_stats(
    hidden_tile: Tensor, head: LMHead, temp: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CPU sampler before issue 21 (each op over the whole [C, V] canvas)."""
    processed = sampler.logits_for(hidden_tile, head).div_(temp)  # [C, V]
    entropy, confidence = sampler.token_entropy(processed)
    argmax = processed.argmax(dim=-1)
    sample = sampler.sample_tokens(processed, generator)
    return entropy, confidence, argmax, sample, sampler.soft_embedding(processed, head)


def compile_case(model: DiffusionGemma, name: str, n: int, dtype_name: str, args: argparse.Namespace) -> None:
    """Median step time of the eager model and of a compiled copy (`compile_layers`), taking turns.
    With `--dense-experts` the first is a compiled copy too, its experts dense (every expert on every
    token), against the engine's choice."""
    labels = ("eager", "compiled")
    if args.dense_experts:
        compile_layers(model)
        for layer in model.layers:
            layer.experts.method = DenseExperts()
        labels = ("dense", "engine's")
    eager = make_step(model, name, n)
    compiled_model = load_model(name, DTYPES[dtype_name])
    compile_layers(compiled_model)
    start = time.perf_counter()
    compiled = make_step(compiled_model, name, n)  # its prefill and first step compile
    compile_s = time.perf_counter() - start
    note = f"   prefill and first step compiled {compile_s:.1f} s"
    print_interleaved(
        f"{name:>6} {dtype_name:>4} canvases={n:<3d}",
        labels,
        eager,
        compiled,
        args.warmup + 1,
        args.reps,
        note,
    )


def ab_case(step: Callable[[], None], name: str, n: int, dtype_name: str, args: argparse.Namespace) -> None:
    """Median step time before and after, the two taking turns (A, B, A, B, ...)."""

    def before() -> None:
        with before_issue_21():
            step()

    print_interleaved(
        f"{name:>6} {dtype_name:>4} canvases={n:<3d}",
        ("before", "after"),
        before,
        step,
        args.warmup,
        args.reps,
    )


def print_interleaved(
    case: str,
    labels: tuple[str, str],
    old_step: Callable[[], None],
    new_step: Callable[[], None],
    warmup: int,
    reps: int,
    note: str = "",
) -> None:
    """Time two steps in turn and print their median wall and CPU ms and the ratio."""
    old, new = time_interleaved([old_step, new_step], warmup, reps)
    old_ms, new_ms = statistics.median(old.wall) * 1e3, statistics.median(new.wall) * 1e3
    old_cpu, new_cpu = statistics.median(old.cpu) * 1e3, statistics.median(new.cpu) * 1e3
    a, b = labels
    print(
        f"{case} wall: {a} {old_ms:8.1f} ms  {b} {new_ms:8.1f} ms ({old_ms / new_ms:4.2f}x)   "
        f"CPU: {a} {old_cpu:8.1f} ms  {b} {new_cpu:8.1f} ms ({old_cpu / new_cpu:4.2f}x){note}",
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=["bench", "sudoku"], nargs="+", default=["bench", "sudoku"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--ab", action="store_true", help="time before/after issue 21 instead of profiling")
    parser.add_argument(
        "--compile", action="store_true", help="time eager against --compile (engine.model.compiled) instead"
    )
    parser.add_argument(
        "--dense-experts", action="store_true", help="with --compile: dense experts against the engine's"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args.threads)
    for dtype_name in [] if args.ab or args.compile else args.dtype:
        print(f"matmul peak {dtype_name}: {matmul_gflops(DTYPES[dtype_name], 2048):.1f} GFLOP/s", flush=True)
    for name in args.model:
        for dtype_name in args.dtype:
            model = load_model(name, DTYPES[dtype_name])
            if args.compile:
                for n in args.canvases:
                    compile_case(model, name, n, dtype_name, args)
                continue
            annotate(model)
            for n in args.canvases:
                one_case(model, name, n, dtype_name, args)
    print(f"load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
