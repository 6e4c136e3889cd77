"""Solve rates on 28-35-clue puzzles made in different ways: how the training and held-out sets differ.

Five sets of `--count` puzzles, each clue count uniform in 28-35, solved through the engine with the
model's own sampler defaults (adaptive stopping), as `eval.py` solves them:

- pool, minimal + random reveals: the training pool's minimal puzzles under a random symmetry with random
  solution cells revealed (what `TrainSampler` drew with `dug_fraction` 0);
- new, minimal + random reveals: the same, from freshly generated grids;
- pool, dug: the pool's puzzles rebuilt at the clue count from their dig order (`dug_fraction` 1);
- new, dug: `make_puzzle(rng, clues)` on fresh grids, the way the held-out set is made;
- held-out: the held-out set's 28-35 band itself (`eval.py`).

Every set has its own fixed seed, so the table is the same on every run for the same weights.

    python -m recipes.sudoku.distributions --models models/sudoku recipes/sudoku/data/run
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engine.model.loader import load_checkpoint
from recipes.sudoku import MODEL_DIR
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import DATA_DIR, EVAL_SEED, Pair, TrainSampler, banded_set, dug_pool, split_dug
from recipes.sudoku.eval import adaptive, run_band
from recipes.sudoku.puzzles import add_clues, make_puzzle

LOW, HIGH = 28, 35


def from_pool(
    count: int, seed: int, dug_fraction: float, pool_size: int = 6000, data_dir: Path = DATA_DIR
) -> list[Pair]:
    """`count` draws of one `TrainSampler` over the training pool at 28-35 clues."""
    pairs, orders = split_dug(dug_pool(pool_size, data_dir=data_dir))
    rng = random.Random(seed)
    sampler = TrainSampler(pairs, rng, LOW, HIGH, dig_orders=orders, dug_fraction=dug_fraction)
    return [sampler.clued() for _ in range(count)]


def new_revealed(count: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    minimal = [make_puzzle(rng) for _ in range(count)]
    return [(add_clues(p, s, rng.randint(LOW, HIGH), rng), s) for p, s in minimal]


def new_dug(count: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    return [make_puzzle(rng, rng.randint(LOW, HIGH), max_tries=400) for _ in range(count)]


def puzzle_sets(count: int) -> dict[str, Callable[[], list[Pair]]]:
    return {
        "pool, minimal + random reveals": lambda: from_pool(count, 123, 0.0),
        "new, minimal + random reveals": lambda: new_revealed(count, 99),
        "pool, dug to the clue count": lambda: from_pool(count, 11, 1.0),
        "new, dug to the clue count": lambda: new_dug(count, 7),
        "held-out set (new, dug)": lambda: banded_set(100, EVAL_SEED)["28-35"][:count],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", default=[MODEL_DIR])
    parser.add_argument("--count", type=int, default=100, help="puzzles per set (the held-out band has 100)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = [load_checkpoint(path, with_tokenizer=False) for path in args.models]
    print("| 28-35 clues | " + " | ".join(str(path) for path in args.models) + " |")
    print("|---" * (len(args.models) + 1) + "|")
    for name, make in puzzle_sets(args.count).items():
        pairs = make()
        cells = [run_band(c.model, c.defaults, pairs, adaptive, 50).cell() for c in checkpoints]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
