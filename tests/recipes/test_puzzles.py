"""Puzzle generator, solver, symmetries and the token layout of the Sudoku recipe."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from recipes.sudoku import tokens
from recipes.sudoku.augment import augment
from recipes.sudoku.data import TrainSampler, check_disjoint, dug_pool, minimal_pool
from recipes.sudoku.puzzles import (
    add_clues,
    consistent,
    count_solutions,
    dug_clues,
    from_string,
    is_valid_solution,
    make_dug_puzzle,
    make_puzzle,
    random_grid,
    solve,
    to_string,
)

# A classic easy puzzle (30 clues) and its unique solution.
EASY = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
EASY_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def test_solver_on_known_puzzle() -> None:
    assert solve(from_string(EASY)) == from_string(EASY_SOLUTION)
    assert count_solutions(from_string(EASY)) == 1
    assert count_solutions([0] * 81) == 2  # capped


def test_invalid_grids() -> None:
    grid = from_string(EASY_SOLUTION)
    assert is_valid_solution(grid)
    grid[0], grid[1] = grid[1], grid[0]
    assert not is_valid_solution(grid)
    assert count_solutions([1, 1] + [0] * 79) == 0


@pytest.mark.parametrize("num_clues", [0, 24, 30, 40])
def test_generated_puzzles_are_unique_and_consistent(num_clues: int) -> None:
    rng = random.Random(num_clues)
    for _ in range(3):
        puzzle, solution = make_puzzle(rng, num_clues)
        assert is_valid_solution(solution) and consistent(puzzle, solution)
        assert count_solutions(puzzle) == 1
        if num_clues:
            assert sum(1 for d in puzzle if d) == num_clues
        else:  # minimal: removing any clue breaks uniqueness
            cell = next(i for i, d in enumerate(puzzle) if d)
            assert count_solutions([*puzzle[:cell], 0, *puzzle[cell + 1 :]]) == 2


def test_generator_is_seeded() -> None:
    assert make_puzzle(random.Random(7), 35) == make_puzzle(random.Random(7), 35)
    assert random_grid(random.Random(1)) != random_grid(random.Random(2))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_dig_order_rebuilds_the_generators_puzzle_at_every_clue_count(seed: int) -> None:
    puzzle, solution, order = make_dug_puzzle(random.Random(seed))
    assert (puzzle, solution) == make_puzzle(random.Random(seed))  # the same draws
    assert sorted(o for o in order if o) == list(range(1, 82 - sum(1 for d in puzzle if d)))
    assert all((o == 0) == (d != 0) for o, d in zip(order, puzzle, strict=True))
    low = sum(1 for d in puzzle if d)
    for num_clues in (low, low + 1, 30, 36, 45):
        dug = dug_clues(puzzle, solution, order, num_clues)
        assert dug == make_puzzle(random.Random(seed), num_clues)[0]
    assert dug_clues(puzzle, solution, order, low - 2) == puzzle  # below the minimal puzzle: itself


def test_the_pool_file_keeps_the_dig_orders(tmp_path: Path) -> None:
    made = dug_pool(3, seed=4, data_dir=tmp_path)
    assert dug_pool(3, seed=4, data_dir=tmp_path) == made  # read back from the file
    assert minimal_pool(3, seed=4, data_dir=tmp_path) == [(p, s) for p, s, _ in made]
    assert made[0] == make_dug_puzzle(random.Random(4))


def test_sampler_draws_dug_puzzles_on_request_and_keeps_its_stream_without() -> None:
    dug = [make_dug_puzzle(random.Random(seed)) for seed in range(4)]
    pool = [(p, s) for p, s, _ in dug]
    orders = [o for _, _, o in dug]
    plain = TrainSampler(pool, random.Random(5), 30, 40).batch(6)
    same = TrainSampler(pool, random.Random(5), 30, 40, dig_orders=orders, dug_fraction=0.0).batch(6)
    assert (plain.prompts == same.prompts).all()
    sampler = TrainSampler(pool, random.Random(5), 30, 40, dig_orders=orders, dug_fraction=1.0)
    for _ in range(6):
        clued, solution = sampler.example()
        assert 30 <= sum(1 for d in clued if d) <= 40
        assert consistent(clued, solution) and count_solutions(clued) == 1
    with pytest.raises(ValueError, match="dig orders"):
        TrainSampler(pool, random.Random(5), 30, 40, dug_fraction=0.5)


def test_symmetries_and_added_clues_preserve_validity_and_uniqueness() -> None:
    rng = random.Random(0)
    puzzle, solution = make_puzzle(rng)
    for _ in range(20):
        p, s = augment(puzzle, solution, rng)
        assert is_valid_solution(s) and consistent(p, s)
        assert sum(1 for d in p if d) == sum(1 for d in puzzle if d)
        assert count_solutions(p) == 1
        easier = add_clues(p, s, 45, rng)
        assert sum(1 for d in easier if d) == 45 and consistent(easier, s) and count_solutions(easier) == 1


def test_sampler_batches_and_disjointness() -> None:
    rng = random.Random(0)
    pool = [make_puzzle(rng) for _ in range(4)]
    batch = TrainSampler(pool, rng, 30, 40).batch(5)
    assert batch.prompts.shape == (5, tokens.PROMPT_LENGTH) and batch.targets.shape == (
        5,
        tokens.CANVAS_LENGTH,
    )
    assert batch.num_clues.min() >= 30 and batch.num_clues.max() <= 40
    assert (batch.prompts[:, 0] == tokens.BOS).all() and (batch.targets[:, -1] == tokens.EOS).all()
    check_disjoint(pool, {"x": [make_puzzle(random.Random(99), 40)]})
    with pytest.raises(ValueError, match="overlaps"):
        check_disjoint(pool, {"x": pool[:1]})


def test_token_layout() -> None:
    puzzle, solution = from_string(EASY), from_string(EASY_SOLUTION)
    prompt = tokens.prompt_ids(puzzle)
    assert len(prompt) == 82 and prompt[:4] == [tokens.BOS, 10, 8, tokens.BLANK]
    canvas = tokens.canvas_ids(solution)
    assert tokens.grid_from_ids(canvas) == solution and canvas[-1] == tokens.EOS
    pins = tokens.pinned_clues(puzzle)
    assert len(pins) == tokens.CANVAS_LENGTH and pins[0] == 10 and pins[2] == -1 and pins[-1] == -1
    assert to_string(puzzle) == EASY
