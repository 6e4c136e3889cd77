"""Which held-out puzzles the models fail, by the length of their chain of simple deductions.

`singles_rounds(puzzle)` counts the rounds of "singles" a human solver needs: each round fills, all at
once, every blank with one candidate left (naked single) and every digit that has one place left in a
row, column or box (hidden single); None when the rounds stop before the grid is full (the puzzle needs
more than singles). `main` solves the held-out set with each model (its saved sampler settings,
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

from engine.generate import generate
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from recipes.sudoku import tokens
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import DATA_DIR, EVAL_SEED, Pair, banded_set
from recipes.sudoku.eval import solves
from recipes.sudoku.puzzles import BOX, CELLS, COL, ROW

UNITS = [[i for i in range(CELLS) if key[i] == u] for key in (ROW, COL, BOX) for u in range(9)]
PEERS = [{j for unit in UNITS if i in unit for j in unit} - {i} for i in range(CELLS)]
BUCKETS = ("at most 4", "5-6", "7-9", "10 or more", "stuck")


def _fills(grid: list[int]) -> dict[int, int] | None:
    """The naked and hidden singles of `grid` (cell -> digit); None if a blank has no candidate."""
    candidates = {i: set(range(1, 10)) - {grid[j] for j in PEERS[i]} for i in range(CELLS) if not grid[i]}
    if any(not c for c in candidates.values()):
        return None
    fills = {i: next(iter(c)) for i, c in candidates.items() if len(c) == 1}
    for unit in UNITS:
        placed = {grid[i] for i in unit}
        for digit in set(range(1, 10)) - placed:
            places = [i for i in unit if not grid[i] and digit in candidates[i]]
            if len(places) == 1:
                fills[places[0]] = digit
    return fills


def fill_singles(puzzle: list[int]) -> tuple[list[int], int]:
    """Apply rounds of simultaneous singles until the grid is full or none is left: (grid, rounds)."""
    grid = list(puzzle)
    rounds = 0
    while not all(grid):
        fills = _fills(grid)
        if not fills:
            break
        for cell, digit in fills.items():
            grid[cell] = digit
        rounds += 1
    return grid, rounds


def singles_rounds(puzzle: list[int]) -> int | None:
    """Rounds of simultaneous singles that fill `puzzle`; 0 for a full grid, None if singles get stuck."""
    grid, rounds = fill_singles(puzzle)
    return rounds if all(grid) else None


def bucket(rounds: int | None) -> str:
    if rounds is None:
        return "stuck"
    if rounds <= 4:
        return "at most 4"
    return "5-6" if rounds <= 6 else "7-9" if rounds <= 9 else "10 or more"


def solved(model_dir: Path, pairs: list[Pair]) -> list[bool]:
    """Per puzzle: does the model (with its saved sampler settings) solve it, as eval.py's adaptive row."""
    checkpoint = load_checkpoint(model_dir, with_tokenizer=False)
    prompts = [tokens.prompt_ids(p) for p, _ in pairs]
    params = [SamplingParams(seed=i) for i in range(len(pairs))]
    results = generate(checkpoint.model.eval(), checkpoint.defaults, prompts, params)
    return [solves(r.token_ids, p) for r, (p, _) in zip(results, pairs, strict=True)]


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
