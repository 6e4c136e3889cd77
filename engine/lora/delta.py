"""The segmented LoRA matmul: `y[tokens of a run] += x[run] @ A[row].T @ B[row].T` for every run.

`add_lora_delta` is what a LoRA linear calls after its base output: the Triton kernel
(`engine.kernels.lora_matmul`) where the kernels run (`engine.kernels.dispatch`), the torch
reference otherwise. `expert_lora_delta` is the delta of one expert's weight for the tokens routed to
it, where neighbouring tokens need not share an adapter (a masked sum over the batch's rows).
Stacked weights: A (rows, R, in), B (rows, out, R) with scaling folded into B; a row's rank r <= R
fills its first r ranks and the rest are zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from engine.kernels.dispatch import use_kernels
from engine.lora.index import LoRARuns


def add_lora_delta(
    y: Tensor, x: Tensor, a: Tensor, b: Tensor, runs: LoRARuns, ranks: Mapping[int, int]
) -> Tensor:
    """y (N, out) += the delta of x (N, in) per run, in place; returns y. `ranks`: populated row -> rank
    (runs of other rows add nothing: their rows are zero). The kernel takes stacked ranks up to its
    `MAX_RANK` (128); larger ones run the reference."""
    if use_kernels(x.device):
        from engine.kernels.lora_matmul import MAX_RANK, lora_matmul

        if a.shape[-2] <= MAX_RANK:
            lora_matmul(y, x.contiguous(), a, b, runs.run_table, runs.max_run_len)
            return y
    return lora_delta_reference(y, x, a, b, runs.runs, ranks)


def lora_delta_reference(
    y: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    runs: tuple[tuple[int, int, int], ...],
    ranks: Mapping[int, int],
) -> Tensor:
    """The torch reference: two small matmuls per run of a populated row; y (N, out) in place."""
    for start, end, row in runs:
        rank = ranks.get(row)
        if rank is not None:
            shrunk = x[start:end] @ a[row, :rank].T  # (n, r)
            y[start:end] += (shrunk @ b[row, :, :rank].T).to(y.dtype)  # (n, out)
    return y


def expert_lora_delta(
    x: Tensor, a: Tensor, b: Tensor, token_rows: Tensor, ranks: Mapping[int, int]
) -> Tensor:
    """x (n, in) of one expert's tokens, a (rows, R, in) and b (rows, out, R) of that expert, token_rows
    (n,) -> (n, out): each token's delta from its row (zero for -1 and unpopulated rows)."""
    delta = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for row, rank in ranks.items():
        mask = (token_rows == row).to(x.dtype)[:, None]  # (n, 1)
        delta += mask * ((x @ a[row, :rank].T) @ b[row, :, :rank].T)
    return delta
