# ruff: noqa: N803  (Triton convention: compile-time constants are UPPER_CASE kernel arguments)
"""The segmented LoRA matmul (SGMV): `y[run] += x[run] @ A[row].T @ B[row].T` for every run of tokens.

A run is (start, end, row): consecutive tokens of one adapter side (`engine.lora.index`); the table of
runs is on the device already (the step's one host-to-device copy). Two launches:
- shrink: program (run, tile) computes v = x[tile] @ A[row].T, (BLOCK_T, R) in fp32, looping over `in`;
- expand: program (run, tile, n-block) adds v[tile] @ B[row][n-block].T into y, in y's dtype.
Tokens of no run (the base model's) are never touched, so `y` keeps their base output.
A (rows, R, in) and B (rows, out, R) hold each row's rank zero-padded to R; R <= BLOCK_R.

Pure function over tensors; tested against `engine.lora.delta.lora_delta_reference` under
`TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 16
"""Tokens per tile (tl.dot needs at least 16)."""
MAX_RANK = 128
"""The highest stacked rank R the kernel takes (one register tile of ranks)."""


@triton.jit  # type: ignore[untyped-decorator]
def _shrink_kernel(  # type: ignore[no-untyped-def]
    x_ptr, a_ptr, v_ptr, runs_ptr,
    K, R,
    stride_xt, stride_ar, stride_arank, stride_vt,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    run = tl.program_id(0)
    start = tl.load(runs_ptr + run * 3)
    end = tl.load(runs_ptr + run * 3 + 1)
    row = tl.load(runs_ptr + run * 3 + 2).to(tl.int64)
    tokens = start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    ranks = tl.arange(0, BLOCK_R)  # (BR,)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    if start + tl.program_id(1) * BLOCK_T < end:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            x = tl.load(
                x_ptr + tokens[:, None].to(tl.int64) * stride_xt + ks[None, :],
                mask=(tokens[:, None] < end) & (ks[None, :] < K),
                other=0.0,
            )  # (BT, BK)
            a = tl.load(
                a_ptr + row * stride_ar + ranks[None, :] * stride_arank + ks[:, None],
                mask=(ranks[None, :] < R) & (ks[:, None] < K),
                other=0.0,
            )  # (BK, BR): A[row].T
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        tl.store(
            v_ptr + tokens[:, None].to(tl.int64) * stride_vt + ranks[None, :], acc, mask=tokens[:, None] < end
        )  # fmt: skip


@triton.jit  # type: ignore[untyped-decorator]
def _expand_kernel(  # type: ignore[no-untyped-def]
    v_ptr, b_ptr, y_ptr, runs_ptr,
    N, R,
    stride_vt, stride_br, stride_bn, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    run = tl.program_id(0)
    start = tl.load(runs_ptr + run * 3)
    end = tl.load(runs_ptr + run * 3 + 1)
    row = tl.load(runs_ptr + run * 3 + 2).to(tl.int64)
    tokens = start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    ranks = tl.arange(0, BLOCK_R)  # (BR,)
    if start + tl.program_id(1) * BLOCK_T < end:
        token_mask = tokens[:, None] < end
        v = tl.load(
            v_ptr + tokens[:, None].to(tl.int64) * stride_vt + ranks[None, :], mask=token_mask, other=0.0
        )
        b = tl.load(
            b_ptr + row * stride_br + cols[None, :] * stride_bn + ranks[:, None],
            mask=(ranks[:, None] < R) & (cols[None, :] < N),
            other=0.0,
        )  # (BR, BN): B[row].T
        delta = tl.dot(v, b.to(tl.float32), input_precision="ieee")  # (BT, BN)
        y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_yt + cols[None, :]
        y_mask = token_mask & (cols[None, :] < N)
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block(width: int, largest: int) -> int:
    """A power-of-two tile of at least 16 (tl.dot's minimum) and at most `largest`."""
    return max(16, min(largest, int(triton.next_power_of_2(width))))


def lora_matmul(y: Tensor, x: Tensor, a: Tensor, b: Tensor, run_table: Tensor, max_run_len: int) -> None:
    """y (N, out) += per run, x[run] (n, in) @ a[row].T (in, R) @ b[row].T (R, out); in place.

    `run_table` (num_runs, 3) int32 on x's device: start, end, row. x, y contiguous in their last dim.
    """
    num_runs = run_table.shape[0]
    if num_runs == 0 or max_run_len == 0:
        return
    assert x.stride(-1) == 1 and y.stride(-1) == 1 and a.stride(-1) == 1 and b.stride(-1) == 1
    in_features, out_features, max_rank = x.shape[-1], y.shape[-1], a.shape[-2]
    block_r = _block(max_rank, MAX_RANK)
    assert max_rank <= block_r, f"LoRA rank {max_rank} above the kernel's {MAX_RANK}"
    shrunk = torch.empty(x.shape[0], block_r, dtype=torch.float32, device=x.device)  # (N, BR)
    tiles = triton.cdiv(max_run_len, BLOCK_T)
    block_k = _block(in_features, 64)
    _shrink_kernel[(num_runs, tiles)](
        x, a, shrunk, run_table,
        in_features, max_rank,
        x.stride(0), a.stride(0), a.stride(1), shrunk.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    block_n = _block(out_features, 64)
    _expand_kernel[(num_runs, tiles, triton.cdiv(out_features, block_n))](
        shrunk, b, y, run_table,
        out_features, max_rank,
        shrunk.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_N=block_n,
    )  # fmt: skip
