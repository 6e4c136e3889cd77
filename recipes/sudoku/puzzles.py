"""Sudoku grids and puzzles: a bitmask solver, a solution counter, random full grids, puzzle generation.

A grid is a list of 81 ints in row-major order, 0 for a blank and 1..9 for a digit. The solver is a
depth-first search that always branches on the blank with the fewest candidates (which also performs
naked-single propagation for free). `count_solutions(grid, cap=2)` is the uniqueness test.

`make_puzzle` takes a random full grid and removes clues in random order, keeping each removal only if
the solution stays unique, until the requested number of clues is left. Pure Python: about 0.1-0.3 s
for a near-minimal puzzle on one core (see recipes/sudoku/README.md). `make_dug_puzzle` digs to a
minimal puzzle and keeps the dig order, from which `dug_clues` rebuilds the puzzle at any clue count on
the way: the evaluation sets' distribution, for training.
"""

from __future__ import annotations

import random

CELLS = 81
ALL = 0x1FF  # digits 1..9 as bits 0..8
ROW = [i // 9 for i in range(CELLS)]
COL = [i % 9 for i in range(CELLS)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(CELLS)]
_BIT_DIGIT = {1 << d: d + 1 for d in range(9)}


def digit_masks(grid: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Used-digit bitmasks of every row, column and box; None if the clues already clash."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(grid):
        if d:
            bit = 1 << (d - 1)
            r, c, b = ROW[i], COL[i], BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def _search(
    grid: list[int],
    rows: list[int],
    cols: list[int],
    boxes: list[int],
    cap: int,
    found: list[list[int]],
    rng: random.Random | None,
) -> None:
    """DFS on the blank with fewest candidates; appends solutions to `found` until it holds `cap`."""
    best, best_mask, best_count = -1, 0, 10
    for i in range(CELLS):
        if grid[i] == 0:
            mask = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            count = mask.bit_count()
            if count < best_count:
                best, best_mask, best_count = i, mask, count
                if count <= 1:
                    break
    if best < 0:
        found.append(list(grid))
        return
    if best_count == 0:
        return
    bits = [b for b in _BIT_DIGIT if best_mask & b]
    if rng is not None:
        rng.shuffle(bits)
    r, c, b = ROW[best], COL[best], BOX[best]
    for bit in bits:
        grid[best] = _BIT_DIGIT[bit]
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        _search(grid, rows, cols, boxes, cap, found, rng)
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        grid[best] = 0
        if len(found) >= cap:
            return


def solutions(grid: list[int], cap: int = 2, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `cap` solutions of `grid` (random branch order when `rng` is given)."""
    masks = digit_masks(grid)
    if masks is None:
        return []
    found: list[list[int]] = []
    _search(list(grid), *masks, cap, found, rng)
    return found


def count_solutions(grid: list[int], cap: int = 2) -> int:
    """Number of solutions, counted up to `cap` (so 2 means "two or more")."""
    return len(solutions(grid, cap))


def solve(grid: list[int]) -> list[int] | None:
    """One solution, or None."""
    found = solutions(grid, cap=1)
    return found[0] if found else None


def random_grid(rng: random.Random) -> list[int]:
    """A uniformly-branching random complete grid (randomised backtracking from the empty grid)."""
    return solutions([0] * CELLS, cap=1, rng=rng)[0]


def is_valid_solution(grid: list[int]) -> bool:
    """Every row, column and box holds each digit 1..9 exactly once."""
    if len(grid) != CELLS or any(not 1 <= d <= 9 for d in grid):
        return False
    return digit_masks(grid) is not None


def consistent(puzzle: list[int], grid: list[int]) -> bool:
    """`grid` keeps every clue of `puzzle`."""
    return all(p == 0 or p == g for p, g in zip(puzzle, grid, strict=True))


def make_puzzle(rng: random.Random, num_clues: int = 0, max_tries: int = 50) -> tuple[list[int], list[int]]:
    """(puzzle, solution) with a unique solution and exactly `num_clues` clues.

    `num_clues=0` asks for a minimal puzzle (every remaining clue is needed). Low targets (below about 24)
    are not always reachable from a random grid in one removal pass, so a new grid is tried, up to
    `max_tries` times.
    """
    for _ in range(max_tries):
        solution = random_grid(rng)
        puzzle, _ = _remove_clues(list(solution), rng, num_clues)
        if num_clues == 0 or sum(1 for d in puzzle if d) == num_clues:
            return puzzle, solution
    raise RuntimeError(f"no unique puzzle with {num_clues} clues in {max_tries} tries: ask for more clues")


def make_dug_puzzle(rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """A minimal puzzle as `make_puzzle(rng)` makes it (the same draws), its solution, and its dig order:
    per cell the 1-based step at which removing it kept the solution unique, 0 for the puzzle's clues.
    `dug_clues` rebuilds from these the puzzle `make_puzzle` would have stopped at for any clue count."""
    solution = random_grid(rng)
    puzzle, removed = _remove_clues(list(solution), rng, 0)
    order = [0] * CELLS
    for step, cell in enumerate(removed, start=1):
        order[cell] = step
    return puzzle, solution, order


def dug_clues(puzzle: list[int], solution: list[int], order: list[int], num_clues: int) -> list[int]:
    """Put back the last-removed cells of the dig until `puzzle` has `num_clues` clues: the puzzle the
    generator held when it had `num_clues` left (removals before that point are the same draws)."""
    have = sum(1 for d in puzzle if d)
    last = max(order) - max(0, num_clues - have)
    return [s if o > last else p for p, s, o in zip(puzzle, solution, order, strict=True)]


def _remove_clues(puzzle: list[int], rng: random.Random, num_clues: int) -> tuple[list[int], list[int]]:
    """Remove clues in random order while the solution stays unique, down to `num_clues` (0: as far as
    it goes): the puzzle, and the cells removed in the order they went."""
    order = list(range(CELLS))
    rng.shuffle(order)
    removed: list[int] = []
    for cell in order:
        if CELLS - len(removed) == num_clues:
            break
        digit, puzzle[cell] = puzzle[cell], 0
        if count_solutions(puzzle) == 1:
            removed.append(cell)
        else:
            puzzle[cell] = digit
    return puzzle, removed


def add_clues(puzzle: list[int], solution: list[int], num_clues: int, rng: random.Random) -> list[int]:
    """Reveal random solution cells until `puzzle` has `num_clues` clues (uniqueness is preserved)."""
    out = list(puzzle)
    blanks = [i for i, d in enumerate(out) if d == 0]
    rng.shuffle(blanks)
    for cell in blanks[: max(0, num_clues - (CELLS - len(blanks)))]:
        out[cell] = solution[cell]
    return out


def to_string(grid: list[int]) -> str:
    """81 characters, '.' for blanks."""
    return "".join(str(d) if d else "." for d in grid)


def from_string(text: str) -> list[int]:
    """Parse 81 cells; '.', '0' and '_' are blanks; whitespace is ignored."""
    cells = [ch for ch in text if not ch.isspace()]
    if len(cells) != CELLS:
        raise ValueError(f"a puzzle has 81 cells; got {len(cells)}")
    return [int(ch) if ch.isdigit() else 0 for ch in cells]
