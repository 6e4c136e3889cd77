"""The weight average: its update rule, swapping it in and out, and its place in training and resuming."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.model.loader import load_checkpoint
from recipes.sudoku.weight_average import WeightAverage
from tests.recipes.helpers import straight_and_resumed, tiny_checkpoint
from tests.recipes.test_train import CONFIG


def test_update_follows_the_ramped_decay() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(10.0)
    average.update(model)  # d = min(0.5, 1/10) = 0.1: 0 + 0.9 * 10
    torch.testing.assert_close(average.averages[0], torch.full((1, 2), 9.0))
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(20):  # d = 0.5 from the 9th update on
        average.update(model)
    assert 1.0 < float(average.averages[0][0, 0]) < 1.001


def test_swapped_in_runs_the_average_and_restores_the_weights() -> None:
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    own = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in average.averages:
            p.add_(1.0)
    x = torch.randn(4, 3)
    with average.swapped_in(model):
        torch.testing.assert_close(model(x), x @ (own[0] + 1).T + (own[1] + 1))
    for p, o in zip(model.parameters(), own, strict=True):
        torch.testing.assert_close(p.detach(), o, rtol=0, atol=0)


def test_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(1, 1), decay=1.0)


def test_training_keeps_saves_and_resumes_the_average(tmp_path: Path) -> None:
    init_dir = tiny_checkpoint(tmp_path / "init")
    config = replace(CONFIG, ema=0.9)
    straight, resumed = straight_and_resumed(config, init_dir, tmp_path, tmp_path)
    assert straight.average is not None and resumed.average is not None
    for a, b in zip(straight.average.averages, resumed.average.averages, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    resumed.save()
    saved = load_checkpoint(tmp_path / "b-ema", with_tokenizer=False).model
    for p, avg in zip(saved.parameters(), resumed.average.averages, strict=True):
        torch.testing.assert_close(p.detach(), avg, rtol=0, atol=0)
    moved = any(
        not torch.equal(p.detach(), avg)
        for p, avg in zip(resumed.model.parameters(), resumed.average.averages, strict=True)
    )
    assert moved  # the raw weights are not the average
