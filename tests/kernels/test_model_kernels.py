"""The tiny DiffusionGemma end to end on the GPU path (attention kernel, grouped experts) vs torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kernels import dispatch
from engine.model.loader import load_checkpoint
from tests.engine.checkpoints import CANVAS, VOCAB, save_reference
from tests.engine.model_harness import Harness, Part


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    save_reference(root, seed=1)
    return root


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def run(path: Path, kernels: bool) -> list[torch.Tensor]:
    """A prompt longer than the window, then one mixed step: a prefill, a commit and two canvases."""
    with dispatch.force(kernels):  # the experts' method is chosen at load, attention per batch
        harness = Harness(load_checkpoint(path, with_tokenizer=False).model, block_size=4)
        harness.run([Part("a", tokens(11, 1), 0, True), Part("c", tokens(5, 2), 0, True)])
        return harness.run(
            [
                Part("b", tokens(9, 3), 0, True),
                Part("c", tokens(CANVAS, 4), 5, True),
                Part("a", tokens(CANVAS, 5), 11, False),
                Part("c", tokens(CANVAS, 6), 5 + CANVAS, False),
            ]
        )


def test_model_with_attention_kernel_matches_torch_path(path: Path) -> None:
    for got, expected in zip(run(path, True), run(path, False), strict=True):
        torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
