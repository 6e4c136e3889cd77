"""A segment's result does not depend on what shares its forward, nor on how its cache is paged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from engine.model.loader import load_checkpoint
from tests.engine.checkpoints import CANVAS, VOCAB, save_reference
from tests.engine.model_harness import Harness, Part

PACK_TOL = 5e-5  # fp32 rounding of matmuls whose row count differs; parity with the reference is 1e-4
PROMPT_LEN = 11


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    save_reference(root, seed=1)
    return root


def tokens(n: int, seed: int) -> Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def harness(path: Path, block_size: int = 4) -> Harness:
    return Harness(load_checkpoint(path, with_tokenizer=False).model, block_size=block_size)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def test_denoise_segment_alone_and_packed_with_causal_segments(path: Path) -> None:
    prompt, canvas = tokens(PROMPT_LEN, 1), tokens(CANVAS, 2)
    alone = harness(path)
    alone.run([Part("a", prompt, 0, True)])
    (expected,) = alone.run([Part("a", canvas, PROMPT_LEN, False)])

    packed = harness(path)
    packed.run([Part("a", prompt, 0, True), Part("c", tokens(5, 3), 0, True)])
    (got,) = packed.run(
        [
            Part("b", tokens(9, 4), 0, True),  # another request's prompt prefill
            Part("c", tokens(CANVAS, 5), 5, True),  # another request's canvas commit
            Part("a", canvas, PROMPT_LEN, False),
        ]
    )
    assert max_diff(got, expected) < PACK_TOL


def test_causal_segment_alone_and_packed_with_denoise_segments(path: Path) -> None:
    prompt, canvas = tokens(PROMPT_LEN, 6), tokens(CANVAS, 7)
    alone = harness(path)
    alone.run([Part("a", prompt, 0, True)])
    (expected,) = alone.run([Part("a", canvas, PROMPT_LEN, False)])

    packed = harness(path)
    packed.run([Part("b", tokens(7, 8), 0, True)])
    first_b, same_step = packed.run(
        [
            Part("a", prompt, 0, True),
            Part("b", tokens(CANVAS, 9), 7, False),
            Part("a", canvas, PROMPT_LEN, False),  # reads the prompt written in this very forward
        ]
    )
    (again,) = packed.run([Part("a", canvas, PROMPT_LEN, False)])
    assert max_diff(again, expected) < PACK_TOL
    assert max_diff(same_step, expected) < PACK_TOL
    assert first_b.shape == (CANVAS, VOCAB)


def two_blocks(h: Harness) -> Tensor:
    """Prefill, commit one canvas, then denoise the next: reads span many blocks and the window."""
    h.run([Part("a", tokens(PROMPT_LEN, 10), 0, True)])
    h.run([Part("a", tokens(CANVAS, 11), PROMPT_LEN, True)])
    (logits,) = h.run([Part("a", tokens(CANVAS, 12), PROMPT_LEN + CANVAS, False)])
    return logits


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_size_does_not_change_logits(path: Path, block_size: int) -> None:
    assert max_diff(two_blocks(harness(path, block_size)), two_blocks(harness(path, 4))) < PACK_TOL


def test_non_contiguous_block_table(path: Path) -> None:
    scattered = harness(path, 4)
    needed = (PROMPT_LEN + 2 * CANVAS + 3) // 4
    order = torch.randperm(scattered.num_blocks, generator=torch.Generator().manual_seed(0))[:needed].tolist()
    assert order != sorted(order)
    scattered.tables["a"] = {group: list(order) for group in scattered.kv.group_names}
    assert max_diff(two_blocks(scattered), two_blocks(harness(path, 4))) < PACK_TOL
