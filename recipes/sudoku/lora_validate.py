"""Validation of the `sudoku-hard` adapter during training: solve rate through the engine, best kept.

`AdapterValidator` holds a plain copy of the base model (the engine serves the base with the adapter
beside it, so it cannot run on the training model, whose projections are wrapped) and a validation set
(seed 3, never the held-out seed 2). `validate` serves the deltas saved in an adapter directory as the
server would (`eval.run_band` with the adapter: `adapter_generate.generate_with_adapter`) and returns the
solve rate and median denoise steps; `better` says whether a result beats the best so far (a median
of at most 12 steps first, as the target asks, then more solved, then fewer steps).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from engine.model.loader import load_checkpoint
from recipes.sudoku.data import DATA_DIR, VALID_SEED, Pair, banded_set
from recipes.sudoku.eval import adaptive, run_band

MAX_MEDIAN_STEPS = 12.0
"""Issue 23's bound on the median denoise steps of the solved hard puzzles."""


@dataclass(frozen=True)
class Validation:
    solved: float
    """Share of the validation puzzles solved."""
    median_steps: float
    """Median denoise steps of the solved ones (inf when none is)."""

    def better(self, other: Validation | None) -> bool:
        """The target's order: a median within `MAX_MEDIAN_STEPS` first, then more solved, then fewer
        steps."""
        if other is None:
            return True
        return self._rank() > other._rank()

    def _rank(self) -> tuple[bool, float, float]:
        return (self.median_steps <= MAX_MEDIAN_STEPS, self.solved, -self.median_steps)


class AdapterValidator:
    """Serves the training adapter's current deltas on `size` validation puzzles of `band`."""

    def __init__(self, base_dir: Path, band: str, size: int, data_dir: Path = DATA_DIR) -> None:
        loaded = load_checkpoint(base_dir, with_tokenizer=False)
        self.model = loaded.model.eval()
        self.defaults = loaded.defaults
        self.pairs: list[Pair] = banded_set(size, VALID_SEED, data_dir, bands=(band,))[band]

    def validate(self, adapter_dir: Path) -> Validation:
        """The adapter saved in `adapter_dir` on every validation puzzle, in one `generate` call."""
        band = run_band(self.model, self.defaults, self.pairs, adaptive, len(self.pairs), adapter_dir)
        median = float(statistics.median(band.solved_steps)) if band.solved_steps else float("inf")
        return Validation(band.solve_rate, median)
