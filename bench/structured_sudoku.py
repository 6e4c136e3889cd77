"""Sudoku with and without the regex `[1-9]{81}`: valid grids and solve rate through the engine.

Each row runs the same held-out puzzles (recipes/sudoku's evaluation set, `--per-band` per clue band)
with the shipped sampler settings and the same seeds; "regex" rows add `GrammarSpec("regex",
"[1-9]{81}")` (or "clue regex": the clue's digit at each clue cell, `[1-9]` elsewhere), so every
committed canvas is decoded under the grammar's mask; "+ pin" and "+ renoise" rows run an engine
with guided denoising on (`EngineConfig.guided_pin_skeleton`, `guided_renoise`; `engine.guided_denoise`).
A grid is valid when the output is exactly 81 digits 1-9; solved as `recipes.sudoku.eval.solves`
says; "repaired by the commit" counts the canvases (and positions) whose argmax the grammar changed.

    python bench/structured_sudoku.py --per-band 10 --threads 1
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bench.guided_denoising import Repairs, count_repairs
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.model.loader import load_checkpoint
from engine.request import GrammarSpec, SamplingParams
from recipes.sudoku import MODEL_DIR, tokens
from recipes.sudoku.data import EVAL_SEED, banded_set
from recipes.sudoku.eval import solves

REGEX = GrammarSpec("regex", "[1-9]{81}")
SINGLE = SamplingParams(max_denoising_steps=1)
ParamsFor = Callable[[list[int]], SamplingParams]


def clue_regex(puzzle: list[int]) -> GrammarSpec:
    """81 digits keeping the clues: the clue's digit at a clue cell, [1-9] elsewhere."""
    return GrammarSpec("regex", "".join(str(d) if d else "[1-9]" for d in puzzle))


@dataclass(frozen=True)
class Row:
    """One row: the params of a puzzle, and the engine's guided denoising (`EngineConfig`)."""

    params: ParamsFor
    pin_skeleton: bool = False
    renoise: bool = False


ROWS: dict[str, Row] = {
    "unconstrained": Row(lambda p: SamplingParams()),
    "regex (masked commit)": Row(lambda p: SamplingParams(grammar=REGEX)),
    "regex + renoise": Row(lambda p: SamplingParams(grammar=REGEX), renoise=True),
    "clue regex (masked commit)": Row(lambda p: SamplingParams(grammar=clue_regex(p))),
    "clue regex + pin": Row(lambda p: SamplingParams(grammar=clue_regex(p)), pin_skeleton=True),
    "clue regex + renoise": Row(lambda p: SamplingParams(grammar=clue_regex(p)), renoise=True),
    "clue regex + pin + renoise": Row(
        lambda p: SamplingParams(grammar=clue_regex(p)), pin_skeleton=True, renoise=True
    ),
    "single pass": Row(lambda p: SINGLE),
    "single pass + regex": Row(lambda p: replace(SINGLE, grammar=REGEX)),
    "single pass + clue regex": Row(lambda p: replace(SINGLE, grammar=clue_regex(p))),
}


def run(
    llm: LLM, puzzles: list[list[int]], params: SamplingParams, batch: int
) -> tuple[int, int, int, float]:
    """(valid grids, solved, denoise steps, seconds) over `puzzles`, seeds 0.."""
    valid = solved = steps = 0
    start = time.perf_counter()
    for lo in range(0, len(puzzles), batch):
        chunk = puzzles[lo : lo + batch]
        prompts = [tokens.prompt_ids(p) for p in chunk]
        per = [replace(params(p), seed=lo + i) for i, p in enumerate(chunk)]
        for result, puzzle in zip(llm.generate(prompts, per), chunk, strict=True):
            valid += re.fullmatch("[1-9]{81}", result.text) is not None
            solved += solves(result.token_ids, puzzle)
            steps += sum(result.steps_per_canvas)
    return valid, solved, steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-band", type=int, default=10)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", default=[], help="only rows whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(MODEL_DIR)
    repairs = Repairs()
    count_repairs(repairs)
    puzzles = [p for pairs in banded_set(args.per_band, EVAL_SEED).values() for p, _ in pairs]
    print(f"{len(puzzles)} puzzles ({args.per_band} per band), shipped settings, seeds 0..{len(puzzles) - 1}")
    print(f"{'row':28s} | valid | solved | steps/puzzle | seconds | repaired by the commit")
    for name, row in ROWS.items():
        if args.rows and not any(r in name for r in args.rows):
            continue
        config = EngineConfig(
            max_num_seqs=args.batch, guided_pin_skeleton=row.pin_skeleton, guided_renoise=row.renoise
        )
        llm = LLM(Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config))
        repairs.reset()
        valid, solved, steps, seconds = run(llm, puzzles, row.params, args.batch)
        n = len(puzzles)
        print(
            f"{name:28s} | {valid:2d}/{n} | {solved:2d}/{n} | {steps / n:12.1f} | {seconds:7.1f} | "
            f"{repairs.summary() if repairs.canvases else '-'}"
        )


if __name__ == "__main__":
    main()
