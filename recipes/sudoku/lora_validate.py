"""Validation of the `sudoku-hard` adapter during training: solve rate through the engine, best kept.

`AdapterValidator` holds a plain copy of the base model (the engine serves the base with the adapter
beside it, so it cannot run on the training model, whose projections are wrapped) and a validation set
(seed 3, never the held-out seed 2). `validate` writes the current deltas in PEFT's format, serves them
as the server would (`adapter_generate.generate_with_adapter`) and returns the solve rate and median
denoise steps; `better` says whether a result beats the best so far (more solved, then fewer steps).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from recipes.sudoku import tokens
from recipes.sudoku.adapter_generate import generate_with_adapter
from recipes.sudoku.data import DATA_DIR, VALID_SEED, Pair, banded_set
from recipes.sudoku.eval import solves
from recipes.sudoku.lora_adapter import Adapter


@dataclass(frozen=True)
class Validation:
    solved: float
    """Share of the validation puzzles solved."""
    median_steps: float
    """Median denoise steps of the solved ones (inf when none is)."""

    def better(self, other: Validation | None) -> bool:
        if other is None:
            return True
        return (self.solved, -self.median_steps) > (other.solved, -other.median_steps)


class AdapterValidator:
    """Serves the training adapter's current deltas on `size` validation puzzles of `band`."""

    def __init__(self, base_dir: Path, band: str, size: int, data_dir: Path = DATA_DIR) -> None:
        loaded = load_checkpoint(base_dir, with_tokenizer=False)
        self.model = loaded.model.eval()
        self.defaults = loaded.defaults
        self.pairs: list[Pair] = banded_set(size, VALID_SEED, data_dir, bands=(band,))[band]

    def validate(self, adapter: Adapter, scratch_dir: Path, base_name: str) -> Validation:
        adapter.save(scratch_dir, base_name)
        prompts = [tokens.prompt_ids(puzzle) for puzzle, _ in self.pairs]
        params = [SamplingParams(seed=i) for i in range(len(prompts))]
        results = generate_with_adapter(self.model, self.defaults, prompts, params, scratch_dir)
        steps = [
            result.steps_per_canvas[0]
            for result, (puzzle, _) in zip(results, self.pairs, strict=True)
            if solves(result.token_ids, puzzle)
        ]
        median = float(statistics.median(steps)) if steps else float("inf")
        return Validation(len(steps) / len(self.pairs), median)
