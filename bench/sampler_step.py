"""One sampler step of N canvases on the CPU: one canvas at a time against packed (`engine.packed_sampler`).

What it measures: `engine.sampler.denoise_step` (each canvas's sixty-odd small ops in turn) and
`engine.packed_sampler.packed_denoise_step` (the row-wise work of every canvas in one pass) on the same
hidden states, each with its own copy of N canvases (same seeds), taking turns step by step; the
Sudoku model's shapes by default (vocab 32, hidden 128, canvas 82, bf16). The two give the same
results bit for bit (tests/engine/test_packed_sampler.py); this checks that too, after the timing.

    python bench/sampler_step.py --canvases 1 4 16 64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, start
from bench.timing import time_interleaved
from engine.packed_sampler import packed_denoise_step
from engine.request import StepParams
from engine.sampler import CanvasState, LMHead, denoise_step, init_canvas

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def canvases(n: int, length: int, vocab: int) -> list[CanvasState]:
    return [init_canvas(length, vocab, 1, torch.Generator().manual_seed(i)) for i in range(n)]


def one_case(n: int, head: LMHead, hidden: Tensor, length: int, reps: int) -> tuple[float, float, bool]:
    """(one-at-a-time ms, packed ms, same results) for n canvases taking turns step by step."""
    params = [StepParams(10**9, 0.8, 1.2, 0.3, 1, 0.0)] * n  # never finishes within the timing
    alone, packed = canvases(n, length, head.vocab_size), canvases(n, length, head.vocab_size)
    with torch.inference_mode():
        a, b = time_interleaved(
            [
                lambda: denoise_step(hidden, head, alone, params),
                lambda: packed_denoise_step(hidden, head, packed, params),
            ],
            warmup=3,
            reps=reps,
        )
    same = all(
        torch.equal(x.tokens, y.tokens) and x.step == y.step for x, y in zip(alone, packed, strict=True)
    )
    return statistics.median(a.wall) * 1e3, statistics.median(b.wall) * 1e3, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--length", type=int, default=82)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args(argv)
    start(args.threads)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    head = LMHead.tied(torch.randn(args.vocab, args.hidden, generator=gen).to(dtype), 30.0)
    print(f"{'canvases':>8} {'one at a time ms':>17} {'packed ms':>10} {'speed-up':>8}  same results")
    for n in args.canvases:
        hidden = torch.randn(n * args.length, args.hidden, generator=gen).to(dtype)
        old, new, same = one_case(n, head, hidden, args.length, args.reps)
        print(f"{n:>8} {old:>17.2f} {new:>10.2f} {old / new:>7.2f}x  {same}", flush=True)
    print(f"medians over {args.reps} steps each, taking turns; load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
