"""Which held-out puzzles the models fail, by the length of their chain of simple deductions.

`singles.singles_rounds(puzzle)` counts the rounds of "singles" a human solver needs (None when singles
alone do not solve it). `main` solves the held-out set with each model (its saved sampler settings,
through `engine.generate`, seeds as in eval.py) and prints the solve counts per round bucket and how
many failures the models share. Findings in README.md ("Where the failures are").

Run (about 3 minutes a model on 2 cores):
    python -m recipes.sudoku.chains --models models/sudoku recipes/sudoku/data/OTHER
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.model.loader import load_checkpoint
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import DATA_DIR, EVAL_SEED, Pair, banded_set
from recipes.sudoku.eval import adaptive, outcomes
from recipes.sudoku.singles import BUCKETS, bucket, singles_rounds


def solved(model_dir: Path, pairs: list[Pair]) -> list[bool]:
    """Per puzzle: does the model (with its saved sampler settings) solve it, as eval.py's adaptive row."""
    checkpoint = load_checkpoint(model_dir, with_tokenizer=False)
    done = outcomes(checkpoint.model.eval(), checkpoint.defaults, pairs, adaptive, batch=50)
    return [ok for ok, _ in done]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--bands", nargs="+", default=["28-35", "22-27"])
    parser.add_argument("--per-band", type=int, default=100)
    add_threads_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = banded_set(args.per_band, EVAL_SEED, DATA_DIR, bands=tuple(args.bands))
    for band, pairs in sets.items():
        buckets = [bucket(singles_rounds(p)) for p, _ in pairs]
        print(f"{band}: puzzles per bucket", {b: buckets.count(b) for b in BUCKETS})
        failed: list[set[int]] = []
        for model_dir in args.models:
            ok = solved(model_dir, pairs)
            counts = {b: sum(o for o, k in zip(ok, buckets, strict=True) if k == b) for b in BUCKETS}
            print(f"  {model_dir}: solved {sum(ok)}, per bucket {counts}")
            failed.append({i for i, o in enumerate(ok) if not o})
        print(f"  failed by all {len(args.models)}: {len(set.intersection(*failed))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
