# ruff: noqa: N803  (Triton convention: compile-time constants are UPPER_CASE kernel arguments)
"""The sampler's per-position statistics in one read of the logits, and the soft embedding in a second.

The reference (`engine.sampler`) turns a canvas's [C, V] logits into fp32 `processed` and then makes
several more [C, V] fp32 tensors (log-probabilities, probabilities, their CDF, the bf16 copy for
self-conditioning). Here the LM head's matmul output, [C, V] in the weight dtype (exactly what the
reference rounds through before `.float()`), is the only [C, V] buffer:

1. `_row_stats_kernel`, one program per position, streams its row once and keeps, in registers, the
   running max, sum of exp and sum of exp * (x - max) (hence logsumexp and entropy), the argmax, a
   Gumbel-max sample, and the max and sum of exp of `processed` rounded to the weight dtype (the
   reference's self-conditioning logits);
2. `_soft_probs_kernel` rewrites the buffer in place as softmax(processed in the weight dtype), from
   which one matmul gives the soft embedding.

Sampling differs from the CPU path by design: the reference draws one uniform per position from the
canvas's `torch.Generator` and inverts the CDF; here each step draws one int64 seed from that generator
and the kernel races Gumbel noise from Philox(seed, position * V + token). Both sample exactly from
softmax(processed) and both are reproducible per canvas seed, but they are different streams: the same
seed gives different tokens on CUDA and on the CPU (as CUDA and CPU generators already do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class RowStats:
    """Per-position results of one canvas (all [C] on the logits' device)."""

    entropy: Tensor  # fp32, of softmax(processed)
    confidence: Tensor  # fp32, probability of the argmax token
    argmax: Tensor  # int64
    sample: Tensor  # int64, one draw from softmax(processed)
    round_max: Tensor  # fp32, max of processed rounded to the logits dtype
    round_sum: Tensor  # fp32, sum of exp(rounded - round_max)


def block_v(vocab_size: int, device: torch.device) -> int:
    """Vocabulary tile: wide on the GPU (the row is streamed once), small in the interpreter."""
    return min(4096 if device.type == "cuda" else 256, int(triton.next_power_of_2(vocab_size)))


def row_stats(logits: Tensor, softcap: float | None, temperature: Tensor, seed: Tensor) -> RowStats:
    """Statistics of processed = softcap(logits.float()) / temperature, reading `logits` once.

    logits [C, V] (any float dtype, row-contiguous); temperature 0-d fp32 and seed (1,) int64 on the same
    device (read by the kernel, so nothing syncs with the host).
    """
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1
    entropy, confidence, round_max, round_sum = torch.empty(
        4, rows, dtype=torch.float32, device=logits.device
    )
    argmax = torch.empty(rows, dtype=torch.int64, device=logits.device)
    sample = torch.empty_like(argmax)
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), vocab, temperature, seed,
        entropy, confidence, argmax, sample, round_max, round_sum,
        SOFTCAP=softcap or 0.0,
        BF16=logits.dtype == torch.bfloat16,
        BLOCK_V=block_v(vocab, logits.device),
        num_warps=8,
    )  # fmt: skip
    return RowStats(entropy, confidence, argmax, sample, round_max, round_sum)


def soft_probs_(logits: Tensor, softcap: float | None, temperature: Tensor, stats: RowStats) -> Tensor:
    """In place: logits [C, V] -> softmax(processed.to(logits.dtype), fp32).to(logits.dtype); returns it."""
    rows, vocab = logits.shape
    _soft_probs_kernel[(rows,)](
        logits, logits.stride(0), vocab, temperature, stats.round_max, stats.round_sum,
        SOFTCAP=softcap or 0.0,
        BF16=logits.dtype == torch.bfloat16,
        BLOCK_V=block_v(vocab, logits.device),
        num_warps=8,
    )  # fmt: skip
    return logits


def fused_canvas_step(
    hidden_tile: Tensor,
    weight: Tensor,
    softcap: float | None,
    embed_scale: Tensor,
    temp: Tensor,
    seed: Tensor,
) -> tuple[RowStats, Tensor]:
    """One canvas's sampler statistics and soft embedding: hidden [C, H] -> (RowStats, [C, H]).

    The [C, V] matmul output in the weight dtype is the only vocabulary-wide buffer (reused for the
    probabilities); the reference's fp32 copies are never made.
    """
    logits = F.linear(hidden_tile, weight)  # [C, V] weight dtype
    stats = row_stats(logits, softcap, temp, seed)
    probs = soft_probs_(logits, softcap, temp, stats)  # [C, V] weight dtype, same storage
    return stats, torch.matmul(probs, weight) * embed_scale.to(weight.dtype)  # [C, H]


@triton.jit  # type: ignore[untyped-decorator]
def _processed(raw, temperature, SOFTCAP):  # type: ignore[no-untyped-def]
    """softcap(raw) / T in fp32; tanh(y) = 2 sigmoid(2y) - 1 (tl has no tanh that also runs interpreted)."""
    x = raw.to(tl.float32)
    if SOFTCAP > 0.0:
        x = (2.0 * tl.sigmoid(2.0 * (x / SOFTCAP)) - 1.0) * SOFTCAP
    return x / temperature


@triton.jit  # type: ignore[untyped-decorator]
def _round(x, DTYPE, BF16):  # type: ignore[no-untyped-def]
    """fp32 x rounded to DTYPE (nearest even), back in fp32. bf16 by hand: the interpreter truncates."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit  # type: ignore[untyped-decorator]
def _row_stats_kernel(  # type: ignore[no-untyped-def]
    logits_ptr, stride_row, vocab, temperature_ptr, seed_ptr,
    entropy_ptr, confidence_ptr, argmax_ptr, sample_ptr, round_max_ptr, round_sum_ptr,
    SOFTCAP: tl.constexpr, BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr)
    seed = tl.load(seed_ptr)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    m = float("-inf")  # running max of processed
    s = 0.0  # sum exp(x - m)
    t = 0.0  # sum exp(x - m) * (x - m): entropy = log s - t / s
    best = 0  # argmax (first of ties)
    g_max = float("-inf")  # Gumbel race: argmax of x + Gumbel noise
    g_best = 0
    rm = float("-inf")  # the same max and sum over processed rounded to the logits dtype
    rs = 0.0
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        raw = tl.load(row_ptr + cols, mask=ok, other=0.0)
        x = tl.where(ok, _processed(raw, temperature, SOFTCAP), float("-inf"))
        chunk_max = tl.max(x, axis=0)
        chunk_arg = tl.argmax(x, axis=0)
        best = tl.where(chunk_max > m, v0 + chunk_arg, best)
        m_new = tl.maximum(m, chunk_max)
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # <= 0; 0 before the first chunk
        scale = tl.exp(shift)
        e = tl.exp(x - m_new)  # 0 where masked
        t = (t + shift * s) * scale + tl.sum(e * tl.where(ok, x - m_new, 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new

        u = tl.rand(seed, row * vocab + cols)  # uniform [0, 1)
        race = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
        race_max = tl.max(race, axis=0)
        g_best = tl.where(race_max > g_max, v0 + tl.argmax(race, axis=0), g_best)
        g_max = tl.maximum(g_max, race_max)

        r = tl.where(ok, _round(x, logits_ptr.dtype.element_ty, BF16), float("-inf"))
        rm_new = tl.maximum(rm, tl.max(r, axis=0))
        rs = rs * tl.exp(tl.where(rm == float("-inf"), 0.0, rm - rm_new)) + tl.sum(tl.exp(r - rm_new), axis=0)
        rm = rm_new
    tl.store(entropy_ptr + row, tl.log(s) - t / s)
    tl.store(confidence_ptr + row, 1.0 / s)
    tl.store(argmax_ptr + row, best)  # int32 -> the int64 output
    tl.store(sample_ptr + row, g_best)
    tl.store(round_max_ptr + row, rm)
    tl.store(round_sum_ptr + row, rs)


@triton.jit  # type: ignore[untyped-decorator]
def _soft_probs_kernel(  # type: ignore[no-untyped-def]
    logits_ptr, stride_row, vocab, temperature_ptr, round_max_ptr, round_sum_ptr,
    SOFTCAP: tl.constexpr, BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr)
    rm = tl.load(round_max_ptr + row)
    rs = tl.load(round_sum_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        raw = tl.load(row_ptr + cols, mask=ok, other=0.0)
        r = _round(_processed(raw, temperature, SOFTCAP), logits_ptr.dtype.element_ty, BF16)
        probs = _round(tl.exp(r - rm) / rs, logits_ptr.dtype.element_ty, BF16)
        tl.store(row_ptr + cols, probs.to(logits_ptr.dtype.element_ty), mask=ok)
