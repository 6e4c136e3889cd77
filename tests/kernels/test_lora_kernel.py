"""The segmented LoRA matmul kernel against the torch reference (`lora_delta_reference`)."""

from __future__ import annotations

import pytest
import torch

from engine.attention.types import Segment
from engine.kernels import dispatch
from engine.kernels.lora_matmul import lora_matmul
from engine.lora.delta import add_lora_delta, lora_delta_reference
from engine.lora.index import build_index


def stacks(
    rows: int, rank: int, width_in: int, width_out: int, ranks: dict[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked A (rows, R, in), B (rows, out, R); row r filled to rank ranks[r], zero elsewhere."""
    gen = torch.Generator().manual_seed(rows * 7 + rank)
    a = torch.zeros(rows, rank, width_in)
    b = torch.zeros(rows, width_out, rank)
    for row, r in ranks.items():
        a[row, :r] = torch.randn(r, width_in, generator=gen) * 0.3
        b[row, :, :r] = torch.randn(width_out, r, generator=gen) * 0.3
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize(
    ("sizes", "slots", "rank", "width_in", "width_out"),
    [
        ([5], [0], 4, 32, 48),
        ([3, 20, 7, 16], [1, None, 0, 1], 8, 64, 24),
        ([1, 1, 33, 2], [None, 2, 2, 0], 16, 40, 72),
        ([17, 16], [None, None], 4, 16, 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(
    sizes: list[int],
    slots: list[int | None],
    rank: int,
    width_in: int,
    width_out: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    max_loras = 3
    segments = [Segment(n, 0, i % 2 == 0, {}) for i, n in enumerate(sizes)]  # causal and bidirectional
    ranks = {row: max(1, rank - row % 3) for row in range(2 * max_loras)}
    a, b = stacks(2 * max_loras, rank, width_in, width_out, ranks, dtype)
    total = sum(sizes)
    gen = torch.Generator().manual_seed(total)
    x = torch.randn(total, width_in, generator=gen).to(dtype)
    base = torch.randn(total, width_out, generator=gen).to(dtype)
    index = build_index(segments, slots, max_loras, device)
    if index is None:  # no adapter: nothing to add, and the runner never calls the kernel
        assert all(s is None for s in slots)
        return
    runs = index.tokens
    expected = lora_delta_reference(base.clone().float(), x.float(), a.float(), b.float(), runs.runs, ranks)
    got = base.clone().to(device)
    lora_matmul(got, x.to(device), a.to(device), b.to(device), runs.run_table, runs.max_run_len)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), expected, atol=tol, rtol=tol)
    untouched = torch.ones(total, dtype=torch.bool)
    for start, end, _ in runs.runs:
        untouched[start:end] = False
    assert torch.equal(got.cpu()[untouched], base[untouched])  # base tokens keep their output


def test_the_dispatch_takes_the_kernel_when_forced(device: torch.device) -> None:
    segments = [Segment(4, 0, True, {}), Segment(16, 0, False, {})]
    index = build_index(segments, [0, 0], 1, device)
    assert index is not None
    a, b = stacks(2, 4, 16, 16, {0: 4, 1: 2}, torch.float32)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    expected = lora_delta_reference(torch.zeros(20, 16), x, a, b, index.tokens.runs, {0: 4, 1: 2})
    with dispatch.force(True):
        y = torch.zeros(20, 16, device=device)
        got = add_lora_delta(y, x.to(device), a.to(device), b.to(device), index.tokens, {0: 4, 1: 2})
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
