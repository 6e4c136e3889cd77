"""Rounds of "singles", the simplest Sudoku deductions, that a puzzle needs.

Each round fills, all at once, every blank with one candidate left (naked single) and every digit that
has one place left in a row, column or box (hidden single). `singles_rounds` is None when the rounds stop
before the grid is full (the puzzle needs more than singles). Long chains are where the Sudoku models
fail (README.md, "Where the failures are"); `TrainSampler` can weight its examples toward them. Bitmasks
as in puzzles.py: about 0.3 ms for a 28-35-clue puzzle.
"""

from __future__ import annotations

from recipes.sudoku.puzzles import ALL, BOX, CELLS, COL, ROW, digit_masks

UNITS = [[i for i in range(CELLS) if key[i] == u] for key in (ROW, COL, BOX) for u in range(9)]
SHORT_CHAIN = 6
"""Puzzles that singles solve in at most this many rounds are "short chains" (`is_short_chain`)."""
BUCKETS = ("at most 4", "5-6", "7-9", "10 or more", "stuck")


def _candidates(grid: list[int]) -> dict[int, int] | None:
    """Candidate bitmask (digit d as bit d - 1) of every blank; None if a blank has none or the digits
    already clash."""
    masks = digit_masks(grid)
    if masks is None:
        return None
    rows, cols, boxes = masks
    candidates = {}
    for i in range(CELLS):
        if not grid[i]:
            mask = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            if not mask:
                return None
            candidates[i] = mask
    return candidates


def _fills(grid: list[int]) -> dict[int, int]:
    """The naked and hidden singles of `grid` (cell -> digit); none if a blank has no candidate."""
    candidates = _candidates(grid)
    if candidates is None:
        return {}
    fills = {i: mask.bit_length() for i, mask in candidates.items() if mask & (mask - 1) == 0}
    for unit in UNITS:
        once = twice = 0
        for i in unit:
            mask = candidates.get(i, 0)
            twice |= once & mask
            once |= mask
        only = once & ~twice  # digits with exactly one place left in the unit
        for i in unit:
            mask = candidates.get(i, 0) & only
            if mask:
                fills[i] = mask.bit_length()
    return fills


def _rounds(puzzle: list[int]) -> list[dict[int, int]]:
    """The fills (cell -> digit) of each round of simultaneous singles, until the grid is full or none
    is left."""
    grid = list(puzzle)
    rounds = []
    while not all(grid):
        fills = _fills(grid)
        if not fills:
            break
        for cell, digit in fills.items():
            grid[cell] = digit
        rounds.append(fills)
    return rounds


def fill_singles(puzzle: list[int]) -> tuple[list[int], int]:
    """Apply rounds of simultaneous singles until the grid is full or none is left: (grid, rounds)."""
    grid = list(puzzle)
    rounds = _rounds(puzzle)
    for fills in rounds:
        for cell, digit in fills.items():
            grid[cell] = digit
    return grid, len(rounds)


def cell_rounds(puzzle: list[int]) -> list[int]:
    """The round of singles that fills each cell: 0 for a clue, 1 for what the clues alone give, and so
    on; a blank the rounds never fill gets one more than the last round (it needs more than singles).
    The order a solver learns the cells in, which `train.py`'s deduction-order noise follows."""
    rounds = _rounds(puzzle)
    order = [0 if digit else len(rounds) + 1 for digit in puzzle]
    for number, fills in enumerate(rounds, start=1):
        for cell in fills:
            order[cell] = number
    return order


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


def is_short_chain(puzzle: list[int]) -> bool:
    """Solved by singles in at most `SHORT_CHAIN` rounds."""
    rounds = singles_rounds(puzzle)
    return rounds is not None and rounds <= SHORT_CHAIN
