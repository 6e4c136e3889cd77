"""Puzzle sets: the training pool, the validation and held-out evaluation sets, and training batches.

Training draws from a pool of *minimal* unique puzzles (22-26 clues, generated once with seed 1 and
cached under recipes/sudoku/data/, which git ignores, with each cell's step in the dig). An example
takes the puzzle the dig held at a clue count drawn for it (as the evaluation sets are made; the shipped
recipe) or reveals random solution cells of the minimal puzzle up to that count, then applies a random
symmetry (recipes.sudoku.augment); both keep the solution unique, so any clue count from the pool's up
to 81 costs nothing. The evaluation and validation sets are generated directly at their clue counts with
their own seeds, and `check_disjoint` verifies that none of their solution grids is in the pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from recipes.sudoku.augment import augment
from recipes.sudoku.puzzles import add_clues, dug_clues, from_string, make_dug_puzzle, make_puzzle, to_string
from recipes.sudoku.singles import cell_rounds, is_short_chain
from recipes.sudoku.tokens import canvas_ids, prompt_ids

DATA_DIR = Path(__file__).resolve().parent / "data"
POOL_SEED = 1
EVAL_SEED = 2
VALID_SEED = 3
BANDS = {"36-45": (36, 45), "28-35": (28, 35), "22-27": (22, 27)}

Pair = tuple[list[int], list[int]]
Dug = tuple[list[int], list[int], list[int]]
"""A minimal puzzle, its solution and its dig order (`puzzles.make_dug_puzzle`)."""


def _read(path: Path) -> list[Pair]:
    pairs = []
    for line in path.read_text().splitlines():
        puzzle, solution = line.split(",")
        pairs.append((from_string(puzzle), from_string(solution)))
    return pairs


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)


def dug_pool(count: int, seed: int = POOL_SEED, data_dir: Path = DATA_DIR) -> list[Dug]:
    """`count` minimal unique puzzles with their solutions and dig orders, cached in `data_dir`."""
    path = data_dir / f"pool-s{seed}-n{count}-dug.txt"
    if path.is_file():
        return [_read_dug(line) for line in path.read_text().splitlines()]
    rng = random.Random(seed)
    pool = [make_dug_puzzle(rng) for _ in range(count)]
    _write(path, [f"{to_string(p)},{to_string(s)},{' '.join(map(str, o))}" for p, s, o in pool])
    return pool


def _read_dug(line: str) -> Dug:
    puzzle, solution, order = line.split(",")
    return from_string(puzzle), from_string(solution), [int(step) for step in order.split()]


def split_dug(pool: list[Dug]) -> tuple[list[Pair], list[list[int]]]:
    """The (puzzle, solution) pairs and the dig orders of a dug pool, as `TrainSampler` takes them."""
    return [(puzzle, solution) for puzzle, solution, _ in pool], [order for _, _, order in pool]


def minimal_pool(count: int, seed: int = POOL_SEED, data_dir: Path = DATA_DIR) -> list[Pair]:
    """`count` minimal unique puzzles with their solutions (the dug pool's, without the dig orders)."""
    return split_dug(dug_pool(count, seed, data_dir))[0]


def banded_set(
    per_band: int, seed: int, data_dir: Path = DATA_DIR, bands: tuple[str, ...] = tuple(BANDS)
) -> dict[str, list[Pair]]:
    """`per_band` puzzles per clue band, clue counts uniform within the band, cached in `data_dir`."""
    sets = {}
    for band in bands:
        low, high = BANDS[band]
        path = data_dir / f"set-s{seed}-{band}-n{per_band}.txt"
        if path.is_file():
            sets[band] = _read(path)
            continue
        rng = random.Random(f"{seed}-{band}")
        pairs = [make_puzzle(rng, rng.randint(low, high), max_tries=400) for _ in range(per_band)]
        _write(path, [f"{to_string(p)},{to_string(s)}" for p, s in pairs])
        sets[band] = pairs
    return sets


def check_disjoint(pool: list[Pair], sets: dict[str, list[Pair]]) -> None:
    """Raise if any held-out solution grid (or puzzle) also occurs in the training pool."""
    seen = {to_string(s) for _, s in pool} | {to_string(p) for p, _ in pool}
    for band, pairs in sets.items():
        for puzzle, solution in pairs:
            if to_string(solution) in seen or to_string(puzzle) in seen:
                raise ValueError(f"held-out puzzle {to_string(puzzle)} ({band}) overlaps the training pool")


@dataclass(frozen=True)
class Batch:
    prompts: Tensor  # (B, 82) long
    targets: Tensor  # (B, 82) long: the clean canvas
    num_clues: Tensor  # (B,) long
    order: Tensor | None = None
    """(B, 82) long: the round of singles that fills each canvas cell (`singles.cell_rounds`; the eos
    position 0, as a clue), when the batch was drawn `with_order`."""


class TrainSampler:
    """Random augmented examples from a pool; clue counts uniform in [min_clues, max_clues].

    With `short_chain_keep` < 1, an example that singles solve in at most `SHORT_CHAIN` rounds
    (`singles.is_short_chain`) is kept only with that probability and drawn again otherwise, which
    weights the data toward the long deduction chains the models fail on.
    """

    def __init__(
        self,
        pool: list[Pair],
        rng: random.Random,
        min_clues: int,
        max_clues: int,
        short_chain_keep: float = 1.0,
        dig_orders: list[list[int]] | None = None,
        dug_fraction: float = 0.0,
    ) -> None:
        if dug_fraction > 0 and dig_orders is None:
            raise ValueError("dug_fraction > 0 needs the pool's dig orders")
        self.pool = pool
        self.rng = rng
        self.min_clues = min_clues
        self.max_clues = max_clues
        self.short_chain_keep = short_chain_keep
        self.dig_orders = dig_orders
        self.dug_fraction = dug_fraction

    def clued(self) -> Pair:
        """A pool puzzle under a random symmetry at a random clue count: with probability `dug_fraction`
        the puzzle its dig held at that count (how the evaluation sets are made), else the minimal
        puzzle with random solution cells revealed."""
        index = self.rng.randrange(len(self.pool))  # the draw `rng.choice(pool)` makes
        if self.dig_orders is not None and self.dug_fraction > 0 and self.rng.random() < self.dug_fraction:
            puzzle, solution = self.pool[index]
            target = self.rng.randint(self.min_clues, self.max_clues)
            return augment(dug_clues(puzzle, solution, self.dig_orders[index], target), solution, self.rng)
        puzzle, solution = augment(*self.pool[index], self.rng)
        target = self.rng.randint(self.min_clues, self.max_clues)
        return add_clues(puzzle, solution, target, self.rng), solution

    def example(self) -> Pair:
        while True:
            clued, solution = self.clued()
            keep = self.short_chain_keep
            if keep >= 1 or not is_short_chain(clued) or self.rng.random() < keep:
                return clued, solution

    def batch(self, size: int, with_order: bool = False) -> Batch:
        """`size` examples; `with_order` adds each cell's round of singles (about 0.3 ms a puzzle)."""
        pairs = [self.example() for _ in range(size)]
        return Batch(
            prompts=torch.tensor([prompt_ids(p) for p, _ in pairs]),
            targets=torch.tensor([canvas_ids(s) for _, s in pairs]),
            num_clues=torch.tensor([sum(1 for d in p if d) for p, _ in pairs]),
            order=torch.tensor([[*cell_rounds(p), 0] for p, _ in pairs]) if with_order else None,
        )
