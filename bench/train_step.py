"""Training-step time of the Sudoku recipe: eager layers, compiled layers, several canvases per puzzle.

What it measures: `recipes.sudoku.train.Trainer.train_step` (64 canvases of augmented puzzles,
corruption, forward, backward, clipping, AdamW, and with `--ema` the weight average) on the shipped model
config from a seeded initial checkpoint, for three trainers: the eager layers (`EAGER`), the
`torch.compile`d ones (`--compile true`), and the compiled ones with `--canvases-per-puzzle 4` (16
puzzles a step, each prompt encoded once for its 4 canvases). Every step has the same 64 canvases, so
step times compare directly. Plain steps and self-conditioned steps (one extra no-grad pass over the
canvases) are timed separately, since the recipe mixes them half and half. Each trainer first runs
`--warmup` steps of each kind (the compiled ones compile there; that time is reported), then the
trainers take turns step by step so that load from elsewhere hits them alike.

Run (about 5 minutes on 2 cores):
    python bench/train_step.py --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import machine_header
from bench.timing import time_interleaved
from recipes.sudoku.checkpoint import init_checkpoint
from recipes.sudoku.train import TrainConfig, Trainer


def make_trainer(config: TrainConfig, work: Path, name: str) -> Trainer:
    return Trainer(config, work / "init", work / name, work / f"{name}.pt", data_dir=work)


def warm_up(trainer: Trainer, steps: int) -> float:
    """Run `steps` plain and `steps` self-conditioned steps; seconds taken."""
    start = time.perf_counter()
    for self_cond in (0.0, 1.0):
        trainer.config = replace(trainer.config, self_cond_prob=self_cond)
        for _ in range(steps):
            trainer.train_step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind per trainer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ema", type=float, default=0.998)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init_checkpoint(work / "init", seed=0)
        base = TrainConfig(  # the step the bench has always timed: batch 64, uniform noise, eager
            schedule="steps",
            pool_size=64,
            eval_size=1,
            ema=args.ema,
            batch_size=64,
            compile=False,
            dug_fraction=0.0,
            ordered_fraction=0.0,
        )
        compiled = replace(base, compile=True)
        trainers = {
            "eager": make_trainer(base, work, "eager"),
            "compiled": make_trainer(compiled, work, "compiled"),
            "compiled, 4 per puzzle": make_trainer(replace(compiled, canvases_per_puzzle=4), work, "shared"),
        }
        for name, trainer in trainers.items():
            print(f"{name}: warm-up {warm_up(trainer, args.warmup):.1f} s")
        for self_cond in (0.0, 1.0):
            for trainer in trainers.values():
                trainer.config = replace(trainer.config, self_cond_prob=self_cond)
            fns = [trainer.train_step for trainer in trainers.values()]
            timings = time_interleaved(fns, warmup=0, reps=args.steps)
            kind = "self-conditioned" if self_cond else "plain"
            medians = [statistics.median(t.wall) for t in timings]
            cells = ", ".join(
                f"{n} {m:.3f} s ({medians[0] / m:.2f}x)" for n, m in zip(trainers, medians, strict=True)
            )
            print(f"{kind} step, median of {args.steps} (speed-up over eager): {cells}")


if __name__ == "__main__":
    main()
