"""An exponential moving average of a model's trainable weights, and a way to run the model with it.

Small models trained with a large learning rate and noisy diffusion losses move a lot from step to
step; the average over the last few hundred steps is usually a better model than the last step's
weights, and it damps how much the end of a run depends on where its last steps happened to land.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """Holds fp32 averages of `model`'s parameters (same order as `model.parameters()`).

    `update()` after every optimizer step: avg <- avg + (1 - d) * (w - avg), with the decay ramped as
    d = min(decay, (1 + n) / (10 + n)) over the n-th update, so early averages are not dominated by the
    random initial weights. Example, decay 0.998: d is 0.1 at the first update, 0.9 at the 81st, and
    0.998 from update 4,491 on; the averaging window then spans about 1 / (1 - d) = 500 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.averages = [p.detach().float().clone() for p in model.parameters()]

    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.averages, params, 1.0 - decay)
        self.num_updates += 1

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block `model` holds the averaged weights; its own weights come back afterwards."""
        saved = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, avg in zip(model.parameters(), self.averages, strict=True):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(model.parameters(), saved, strict=True):
                    p.copy_(own)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "averages": self.averages}

    def load_state_dict(self, state: dict[str, object]) -> None:
        averages = state["averages"]
        assert isinstance(averages, list) and len(averages) == len(self.averages)
        self.averages = [torch.as_tensor(a).float().clone() for a in averages]
        num_updates = state["num_updates"]
        assert isinstance(num_updates, int)
        self.num_updates = num_updates
