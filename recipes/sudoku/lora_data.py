"""Training examples for the `sudoku-hard` adapter: mostly the hardest clue counts, some easier ones.

`BandMixSampler` is the recipe's `TrainSampler` (the same pool, dig, symmetries and deduction order) with
the clue range drawn per example from weighted bands instead of one curriculum range: e.g. 80% at
22-27 clues (the adapter's target), 20% at 28-45 so the easier bands are not forgotten.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from recipes.sudoku.data import Pair, TrainSampler


@dataclass(frozen=True)
class ClueBand:
    weight: float
    low: int
    high: int


class BandMixSampler(TrainSampler):
    """Each example picks a band by weight, then a clue count uniform in it (`TrainSampler.example`)."""

    def __init__(
        self,
        pool: list[Pair],
        rng: random.Random,
        bands: list[ClueBand],
        dig_orders: list[list[int]] | None = None,
        dug_fraction: float = 1.0,
    ) -> None:
        if (
            not bands
            or any(b.weight < 0 or b.low > b.high for b in bands)
            or sum(b.weight for b in bands) <= 0
        ):
            raise ValueError(f"bands need non-negative weights summing above 0 and low <= high: {bands}")
        super().__init__(
            pool, rng, bands[0].low, bands[0].high, dig_orders=dig_orders, dug_fraction=dug_fraction
        )
        self.bands = bands

    def example(self) -> Pair:
        band = self.rng.choices(self.bands, weights=[b.weight for b in self.bands])[0]
        self.min_clues, self.max_clues = band.low, band.high
        return super().example()
