"""A few training steps on a tiny config: the loss falls, resuming is exact, saved weights load everywhere."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from engine.model.loader import load_checkpoint, our_name
from recipes.sudoku.checkpoint import checkpoint_name
from recipes.sudoku.data import TrainSampler
from recipes.sudoku.dense_forward import Passes, decode_canvases
from recipes.sudoku.puzzles import make_puzzle
from recipes.sudoku.train import (
    TrainConfig,
    Trainer,
    corrupt,
    lr_at,
    min_clues_at,
    ordered_hits,
    parse_args,
    run_config,
    sampler_canvas,
    training_loss,
)
from tests.recipes.helpers import straight_and_resumed, tiny_checkpoint

CONFIG = TrainConfig(  # the recipe's data and noise; eager, no average, a step schedule
    batch_size=8,
    lr=3e-3,
    warmup=2,
    steps=30,
    schedule="steps",
    pool_size=4,
    eval_size=1,
    compile=False,
    ema=0.0,
)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-init"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize(("own_canvas", "ordered_fraction"), [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_a_few_steps_lower_the_loss(init_dir: Path, own_canvas: bool, ordered_fraction: float) -> None:
    torch.manual_seed(0)
    model = load_checkpoint(init_dir, with_tokenizer=False).model.train().requires_grad_(True)
    rng = random.Random(0)
    batch = TrainSampler([make_puzzle(rng) for _ in range(4)], rng, 30, 45).batch(16, with_order=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_loss() -> float:  # one fixed corruption, no self-conditioning
        with torch.no_grad():
            return float(training_loss(model, batch, torch.Generator().manual_seed(99), False)[0])

    before = held_loss()
    for step in range(12):
        generator = torch.Generator().manual_seed(step % 3)  # the same three corruptions, cycled
        loss, _ = training_loss(
            model, batch, generator, step % 2 == 1, own_canvas, ordered_fraction=ordered_fraction
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_loss() < 0.8 * before


def test_sampler_canvas_keeps_the_most_confident_draws() -> None:
    # Row 0: positions 0..4 are near one-hot on token 7 + position, the rest flat (high entropy).
    processed = torch.zeros(2, 10, 32)
    for i in range(5):
        processed[0, i, 7 + i] = 50.0
    processed[1] = processed[0].flip(0)  # the confident positions are 5..9 in row 1
    keep = torch.tensor([5, 3])
    canvas = sampler_canvas(processed, keep, 32, torch.Generator().manual_seed(0))
    assert canvas[0, :5].tolist() == [7, 8, 9, 10, 11]
    # Row 1 keeps 3 of its 5 confident positions; every other position is uniform noise.
    kept = [i for i in range(5, 10) if canvas[1, i] == 7 + (9 - i)]
    assert len(kept) >= 3
    noise = torch.cat([canvas[0, 5:], canvas[1, :5]])
    assert len(set(noise.tolist())) > 3  # not a copy of any prediction


def test_deduction_order_noise_corrupts_the_late_cells() -> None:
    rng = random.Random(5)
    batch = TrainSampler([make_puzzle(rng) for _ in range(3)], rng, 28, 32).batch(6, with_order=True)
    order = batch.order
    assert order is not None
    t = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    hits = ordered_hits(order, t, torch.Generator().manual_seed(0))
    noisy = corrupt(batch.targets, t, 32, torch.Generator().manual_seed(0), order, 1.0)
    for row in range(6):
        count = round(float(t[row]) * 82)
        assert int(hits[row].sum()) == count
        if 0 < count < 82:
            assert order[row][hits[row]].min() >= order[row][~hits[row]].max()
            threshold = order[row].sort(descending=True).values[count - 1]
            changed = noisy[row] != batch.targets[row]  # a noise draw can equal its target (1 in 32)
            assert changed.any() and bool((order[row][changed] >= threshold).all())
    uniform = corrupt(batch.targets, t, 32, torch.Generator().manual_seed(0))
    unordered = corrupt(batch.targets, t, 32, torch.Generator().manual_seed(0), order, 0.0)
    assert torch.equal(uniform, unordered)  # off, it is the uniform noise, draw for draw


@pytest.mark.parametrize("dug_fraction", [0.0, 1.0])
def test_resume_continues_exactly(
    init_dir: Path, data_dir: Path, tmp_path: Path, dug_fraction: float
) -> None:
    config = replace(CONFIG, dug_fraction=dug_fraction)
    straight, resumed = straight_and_resumed(config, init_dir, tmp_path, data_dir)
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_saved_weights_load_in_engine_and_transformers(
    init_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(CONFIG, init_dir, tmp_path / "out", tmp_path / "out.pt", data_dir)
    trainer.train_step()
    trainer.save()
    reloaded = load_checkpoint(tmp_path / "out").model
    for (name, a), b in zip(trainer.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    reference, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    embed = reference.model.decoder.embed_tokens.weight
    torch.testing.assert_close(embed, trainer.model.embed_tokens.weight.detach())


def test_names_round_trip(init_dir: Path) -> None:
    model = load_checkpoint(init_dir, with_tokenizer=False).model
    for name in model.state_dict():
        assert our_name(checkpoint_name(name)) == name


def test_schedules() -> None:
    config = TrainConfig(
        lr=1.0, warmup=10, min_lr_ratio=0.1, start_min_clues=44, min_clues=24, curriculum=0.5
    )
    assert lr_at(0.0, 0, config) == pytest.approx(0.1) and lr_at(0.0, 10, config) == pytest.approx(1.0)
    assert lr_at(1.0, 99, config) == pytest.approx(0.1) and lr_at(0.5, 99, config) == pytest.approx(0.55)
    assert (
        min_clues_at(0.0, config) == 44
        and min_clues_at(0.25, config) == 34
        and min_clues_at(0.9, config) == 24
    )


def test_resume_keeps_the_saved_settings_unless_overridden() -> None:
    saved = asdict(CONFIG)
    args, given = parse_args(["--out", "x", "--resume", "--minutes", "120", "--compile", "true"])
    assert args.resume and given == {"minutes": 120.0, "compile": True}
    resumed = run_config(given, saved)
    assert (resumed.batch_size, resumed.lr, resumed.schedule) == (8, 3e-3, "steps")
    assert (resumed.minutes, resumed.compile) == (120.0, True)
    fresh = run_config(parse_args(["--batch-size", "16"])[1], None)
    assert fresh == TrainConfig(batch_size=16)


@pytest.mark.parametrize("rounds", [1, 3])
def test_self_cond_rounds_each_read_the_pass_before(init_dir: Path, rounds: int) -> None:
    """The first pass reads no soft embeddings; each further no-grad round reads the one before, and the
    graded pass the last."""
    model = load_checkpoint(init_dir, with_tokenizer=False).model
    rng = random.Random(0)
    batch = TrainSampler([make_puzzle(rng) for _ in range(2)], rng, 30, 45).batch(2)
    seen: list[torch.Tensor | None] = []

    def decode(*args: Any) -> torch.Tensor:
        seen.append(args[3])
        return decode_canvases(*args)

    passes = Passes(decode=decode)
    training_loss(
        model, batch, torch.Generator().manual_seed(0), True, passes=passes, self_cond_rounds=rounds
    )
    assert len(seen) == rounds + 1 and seen[0] is None
    softs = [soft for soft in seen[1:] if soft is not None]
    assert len(softs) == rounds
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(softs))
