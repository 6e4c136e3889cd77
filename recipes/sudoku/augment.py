"""Sudoku symmetries for data augmentation: each maps a valid puzzle/solution pair to another one.

The group used: digit relabelling (9!), row permutations within each band and of the bands
((3!)^3 * 3!), the same for columns within stacks and of stacks, and transposition (x2): about 1.2e12
variants of every grid, all preserving validity and uniqueness of the solution.
"""

from __future__ import annotations

import random

from recipes.sudoku.puzzles import CELLS


def _line_order(rng: random.Random) -> list[int]:
    """A permutation of 0..8 that shuffles the three bands and the three lines inside each band."""
    bands = rng.sample(range(3), 3)
    return [3 * band + line for band in bands for line in rng.sample(range(3), 3)]


def random_symmetry(rng: random.Random) -> tuple[list[int], list[int]]:
    """(cell map, digit map): output cell i takes input cell `cells[i]`; digit d becomes `digits[d]`."""
    rows, cols = _line_order(rng), _line_order(rng)
    transpose = rng.random() < 0.5
    cells = []
    for r in range(9):
        for c in range(9):
            src_r, src_c = rows[r], cols[c]
            if transpose:
                src_r, src_c = src_c, src_r
            cells.append(9 * src_r + src_c)
    digits = [0, *rng.sample(range(1, 10), 9)]  # 0 (blank) stays blank
    return cells, digits


def apply_symmetry(grid: list[int], symmetry: tuple[list[int], list[int]]) -> list[int]:
    cells, digits = symmetry
    assert len(grid) == CELLS
    return [digits[grid[src]] for src in cells]


def augment(puzzle: list[int], solution: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """The same random symmetry applied to a puzzle and its solution."""
    symmetry = random_symmetry(rng)
    return apply_symmetry(puzzle, symmetry), apply_symmetry(solution, symmetry)
