"""The puzzle sets of recipes/sudoku/distributions.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.sudoku.distributions import HIGH, LOW, from_pool, new_dug, new_revealed
from recipes.sudoku.puzzles import consistent, count_solutions


@pytest.mark.parametrize("dug_fraction", [0.0, 1.0])
def test_pool_draws_are_distinct_puzzles_in_the_band(tmp_path: Path, dug_fraction: float) -> None:
    pairs = from_pool(8, seed=1, dug_fraction=dug_fraction, pool_size=4, data_dir=tmp_path)
    assert len({tuple(puzzle) for puzzle, _ in pairs}) == 8
    for puzzle, solution in pairs:
        assert LOW <= sum(1 for d in puzzle if d) <= HIGH
        assert consistent(puzzle, solution) and count_solutions(puzzle) == 1


def test_new_sets_are_seeded_and_in_the_band() -> None:
    assert new_dug(3, seed=7) == new_dug(3, seed=7)
    for puzzle, _ in new_dug(3, seed=7) + new_revealed(3, seed=99):
        assert LOW <= sum(1 for d in puzzle if d) <= HIGH
