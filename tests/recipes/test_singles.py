"""The singles counter behind recipes/sudoku/chains.py: round counts, soundness, and where it gets stuck."""

from __future__ import annotations

import random

from recipes.sudoku.data import TrainSampler
from recipes.sudoku.puzzles import make_puzzle, random_grid
from recipes.sudoku.singles import bucket, cell_rounds, fill_singles, is_short_chain, singles_rounds


def test_round_counts_of_simple_cases() -> None:
    grid = random_grid(random.Random(0))
    assert singles_rounds(grid) == 0
    one_blank = list(grid)
    one_blank[40] = 0
    assert singles_rounds(one_blank) == 1
    assert singles_rounds([0] * 81) is None  # no cell and no digit is forced
    assert [bucket(r) for r in (3, 5, 8, 12, None)] == ["at most 4", "5-6", "7-9", "10 or more", "stuck"]


def test_singles_only_ever_fill_the_solution() -> None:
    rng = random.Random(1)
    completed = 0
    for _ in range(12):
        puzzle, solution = make_puzzle(rng, 28)
        grid, rounds = fill_singles(puzzle)
        assert all(g in (0, s) for g, s in zip(grid, solution, strict=True))
        assert rounds >= 1
        completed += all(grid)
    assert completed > 0  # most 28-clue puzzles fall to singles (86 of 100 held out)


def test_cell_rounds_follow_the_rounds_of_singles() -> None:
    rng = random.Random(4)
    for _ in range(6):
        puzzle, solution = make_puzzle(rng, 30)
        order = cell_rounds(puzzle)
        rounds = singles_rounds(puzzle)
        assert all(r == 0 for r, d in zip(order, puzzle, strict=True) if d)
        assert all(r > 0 for r, d in zip(order, puzzle, strict=True) if not d)
        last = fill_singles(puzzle)[1]
        assert max(order) == (last if rounds is not None else last + 1)  # stuck cells come last
        # Revealing the cells of the first round leaves every other cell one round earlier.
        revealed = [s if r == 1 else d for d, s, r in zip(puzzle, solution, order, strict=True)]
        assert cell_rounds(revealed) == [max(0, r - 1) for r in order]
    assert cell_rounds([0] * 81) == [1] * 81  # nothing forced: every cell is "after the last round"


def test_sampler_weights_toward_long_chains() -> None:
    rng = random.Random(2)
    pool = [make_puzzle(rng) for _ in range(6)]  # minimal puzzles
    plain = TrainSampler(pool, random.Random(3), 30, 36)
    weighted = TrainSampler(pool, random.Random(3), 30, 36, short_chain_keep=0.0)
    short = [is_short_chain(plain.example()[0]) for _ in range(40)]
    assert 0 < sum(short) < 40  # the plain mix has both kinds
    assert not any(is_short_chain(weighted.example()[0]) for _ in range(40))
