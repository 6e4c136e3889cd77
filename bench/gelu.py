"""tanh-GELU times up on the CPU: eager `F.gelu`, compiled `F.gelu`, and the compiled sigmoid form.

`engine.model.methods.plain.gelu_tanh` runs `x * sigmoid(2z)` under `torch.compile` instead of
`F.gelu(approximate="tanh")`: the same function, but inductor's CPU code for `tanh` is several times
slower than its `sigmoid`. This times the three on the shapes of a 16-canvas Sudoku step's MLP and
experts (`gelu(gate) * up`, bf16), taking turns, and prints the largest difference from an fp32
`F.gelu` of the same inputs.

    python bench/gelu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, start
from bench.timing import time_interleaved
from engine.model.methods.plain import gelu_tanh_by_sigmoid


def eager(gate: Tensor, up: Tensor) -> Tensor:
    return F.gelu(gate, approximate="tanh") * up


def by_sigmoid(gate: Tensor, up: Tensor) -> Tensor:
    return gelu_tanh_by_sigmoid(gate) * up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 1312, 256], help="gate's shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    start(args.threads)
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(args.shape, generator=gen).bfloat16() for _ in range(2))
    variants = {
        "eager F.gelu": eager,
        "compiled F.gelu (inductor tanh)": torch.compile(eager, dynamic=True),
        "compiled x * sigmoid(2z)": torch.compile(by_sigmoid, dynamic=True),
    }
    want = eager(gate.float(), up.float())
    with torch.inference_mode():
        timings = time_interleaved([lambda f=f: f(gate, up) for f in variants.values()], 3, args.reps)
        errors = [float((f(gate, up).float() - want).abs().max()) for f in variants.values()]
    elements = gate.numel()
    print(f"{elements / 1e6:.2f}M elements, bf16; median of {args.reps}, taking turns")
    for (name, _), timing, error in zip(variants.items(), timings, errors, strict=True):
        ms = statistics.median(timing.wall) * 1e3
        print(f"{name:<34} {ms:7.3f} ms  {ms * 1e6 / elements:5.2f} ns/element  max |diff| {error:.2e}")
    print(f"load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
