# ruff: noqa: N803  (Triton convention: compile-time constants are UPPER_CASE kernel arguments)
"""Varlen attention over the paged KV cache: one launch per layer for a whole mixed batch.

Same contract as `engine.attention.base` (the reference: `engine.attention.reference`): causal segments
write their K/V into the cache (one torch `index_copy_` per layer for all of them, before the kernel)
and attend to cache positions [first_visible, end) with kv <= q (sliding layers: kv > q - W);
bidirectional segments read cache positions [first_visible, start) plus their own K/V straight from
`k`/`v`, with no mask, and write nothing. Scale 1.0, GQA (query head h reads kv head h // (heads /
kv_heads)), softmax in fp32.

Grid: (query tiles, heads). A query tile is BLOCK_M consecutive tokens of one segment; `tile_seg` and
`tile_q0` map a program to its segment and first row. Per-segment metadata is packed into one int32
tensor (one host-to-device copy per batch and cache group); `engine.attention.triton_backend` builds it
once per forward and passes it to every layer of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.attention.types import LayerCache, Segment, slot_ids


@dataclass(frozen=True)
class BatchMetadata:
    """Device tensors describing one batch for one cache group (all int32 except the write indices)."""

    tile_seg: Tensor  # (num_tiles,) segment of each query tile
    tile_q0: Tensor  # (num_tiles,) first row of the tile within its segment
    seg_q_start: Tensor  # (S,) row of the segment's first token in the flat batch
    seg_len: Tensor  # (S,)
    seg_start_pos: Tensor  # (S,) position of the first token = tokens already cached
    seg_causal: Tensor  # (S,) 1 causal, 0 bidirectional
    block_tables: Tensor  # (S, max_blocks) physical block ids, zero-padded
    write_rows: Tensor  # (W,) int64 rows of causal tokens in the flat batch
    write_slots: Tensor  # (W,) int64 flat cache slots they go to
    block_m: int  # the query tile height the tiles were cut with

    @property
    def num_tiles(self) -> int:
        return int(self.tile_seg.shape[0])


def build_metadata(
    segments: list[Segment], group: str, block_size: int, block_m: int, device: torch.device
) -> BatchMetadata:
    """Pack the segments' layout. Example, BLOCK_M 16, segments of 20 and 8 tokens: tiles
    (seg 0, row 0), (seg 0, row 16), (seg 1, row 0)."""
    tile_seg: list[int] = []
    tile_q0: list[int] = []
    q_starts: list[int] = []
    rows: list[Tensor] = []
    slots: list[Tensor] = []
    row = 0
    for i, s in enumerate(segments):
        q_starts.append(row)
        for q0 in range(0, s.num_tokens, block_m):
            tile_seg.append(i)
            tile_q0.append(q0)
        if s.is_causal and s.num_tokens:
            rows.append(torch.arange(row, row + s.num_tokens))
            slots.append(
                slot_ids(s.block_tables[group], s.start_pos, s.end_pos, block_size, torch.device("cpu"))
            )
        row += s.num_tokens
    width = max([1] + [len(s.block_tables[group]) for s in segments])
    tables = [s.block_tables[group] + [0] * (width - len(s.block_tables[group])) for s in segments]
    flat = (
        tile_seg
        + tile_q0
        + q_starts
        + [s.num_tokens for s in segments]
        + [s.start_pos for s in segments]
        + [int(s.is_causal) for s in segments]
        + [b for t in tables for b in t]
    )
    packed = torch.tensor(flat, dtype=torch.int32).to(device)
    sizes = [len(tile_seg), len(tile_seg)] + [len(segments)] * 4 + [len(segments) * width]
    parts = torch.split(packed, sizes)
    empty = torch.zeros(0, dtype=torch.long)
    writes = torch.stack([torch.cat(rows or [empty]), torch.cat(slots or [empty])]).to(device)  # (2, W)
    return BatchMetadata(
        tile_seg=parts[0],
        tile_q0=parts[1],
        seg_q_start=parts[2],
        seg_len=parts[3],
        seg_start_pos=parts[4],
        seg_causal=parts[5],
        block_tables=parts[6].view(len(segments), width),
        write_rows=writes[0],
        write_slots=writes[1],
        block_m=block_m,
    )


def block_shape(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter uses the smallest tiles tl.dot accepts.
    On the GPU the (BLOCK_M, d) fp32 accumulator must fit the registers and the staged K/V tiles the
    shared memory, so d 512 takes half the rows and two stages. Untuned: first guesses for Hopper."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if head_dim <= 128:
        return 64, 64, 4, 3
    if head_dim <= 256:
        return 64, 32, 8, 2
    return 32, 32, 8, 2


def paged_attention(q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cache: LayerCache) -> Tensor:
    """One-shot drop-in for `batch_attention`: builds the metadata, then `paged_attention_with`."""
    block_m = block_shape(q.shape[-1], q.device)[0]
    meta = build_metadata(segments, cache.group, cache.block_size, block_m, q.device)
    return paged_attention_with(q, k, v, cache, meta)


def paged_attention_with(q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, meta: BatchMetadata) -> Tensor:
    """One layer over prepared metadata (built with this head dim's BLOCK_M and the cache's group):
    q (T, heads, d), k/v (T, kv_heads, d) -> (T, heads, d)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert num_heads % num_kv_heads == 0 and head_dim & (head_dim - 1) == 0, "GQA groups, power-of-2 d"
    assert cache.key.stride() == cache.value.stride() and cache.key.stride(-1) == 1
    block_m, block_n, num_warps, num_stages = block_shape(head_dim, q.device)
    assert meta.block_m == block_m, f"metadata cut for BLOCK_M {meta.block_m}, this head dim runs {block_m}"
    if meta.write_rows.numel():
        flat_key = cache.key.view(-1, *cache.key.shape[2:])  # (slots, kv_heads, d)
        flat_value = cache.value.view(-1, *cache.value.shape[2:])
        flat_key.index_copy_(0, meta.write_slots, k.index_select(0, meta.write_rows).to(cache.key.dtype))
        flat_value.index_copy_(0, meta.write_slots, v.index_select(0, meta.write_rows).to(cache.value.dtype))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    if num_tokens == 0 or meta.num_tiles == 0:
        return out
    _paged_attention_kernel[(meta.num_tiles, num_heads)](
        q, k, v, out, cache.key, cache.value,
        meta.tile_seg, meta.tile_q0, meta.seg_q_start, meta.seg_len, meta.seg_start_pos, meta.seg_causal,
        meta.block_tables,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        cache.key.stride(0), cache.key.stride(1), cache.key.stride(2), meta.block_tables.stride(0),
        WINDOW=cache.window or 0,
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=cache.block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        FP32_DOT=q.dtype == torch.float32 or q.device.type != "cuda",
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _online_softmax_step(acc, m_i, l_i, q, key, value, allowed, FP32_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """Fold one (BLOCK_N, d) key/value tile into the running max m_i, sum l_i and output acc.

    FP32_DOT: fp32 operands, exact fp32 products (fp32 inputs, and the interpreter, whose bf16 tl.dot
    returns garbage in triton 3.9); otherwise tensor-core dots in the input dtype, accumulated in fp32.
    """
    if FP32_DOT:
        scores = tl.dot(q.to(tl.float32), tl.trans(key.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(key))
    scores = tl.where(allowed, scores, float("-inf"))  # (BLOCK_M, BLOCK_N) fp32, scale 1.0
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, value.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value)
    return acc, m_new, l_i


@triton.jit  # type: ignore[untyped-decorator]
def _paged_attention_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, out_ptr, key_cache_ptr, value_cache_ptr,
    tile_seg_ptr, tile_q0_ptr, seg_q_start_ptr, seg_len_ptr, seg_start_ptr, seg_causal_ptr, block_table_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seg = tl.load(tile_seg_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(seg_q_start_ptr + seg)
    n = tl.load(seg_len_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    causal = tl.load(seg_causal_ptr + seg) != 0
    bidirectional = tl.load(seg_causal_ptr + seg) == 0

    rows = q0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows within the segment
    row_ok = rows < n
    q_pos = start + rows
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, d)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)

    # Cache part. Causal: [lo, last row of the tile], own K/V already written; bidirectional: [lo, start).
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(start - WINDOW + 1, 0)
    kv_lo = lo
    if WINDOW > 0:
        kv_lo = tl.where(causal, tl.maximum(start + q0 - WINDOW + 1, lo), lo)
    kv_hi = tl.where(causal, tl.minimum(start + n, start + q0 + BLOCK_M), start)
    for kv0 in range(kv_lo, kv_hi, BLOCK_N):
        pos = kv0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) cache positions
        pos_ok = pos < kv_hi
        block = tl.load(block_table_ptr + seg * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        slot = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        key = tl.load(key_cache_ptr + slot[:, None] + dims[None, :], mask=pos_ok[:, None], other=0.0)
        value = tl.load(value_cache_ptr + slot[:, None] + dims[None, :], mask=pos_ok[:, None], other=0.0)
        visible = pos[None, :] <= q_pos[:, None]
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
        allowed = pos_ok[None, :] & (visible | bidirectional)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, key.to(q.dtype), value.to(q.dtype), allowed, FP32_DOT
        )

    # Own part (bidirectional only): the whole segment, unmasked, read from k/v, never written.
    own_hi = tl.where(causal, 0, n)
    for j0 in range(0, own_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k_offsets = (q_start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        v_offsets = (q_start + cols)[:, None] * stride_vt + kv_head * stride_vh + dims[None, :]
        key = tl.load(k_ptr + k_offsets, mask=col_ok[:, None], other=0.0)
        value = tl.load(v_ptr + v_offsets, mask=col_ok[:, None], other=0.0)
        # The reference concatenates own K/V onto the cached ones, i.e. rounds them to the cache dtype.
        key = key.to(key_cache_ptr.dtype.element_ty).to(q.dtype)
        value = value.to(value_cache_ptr.dtype.element_ty).to(q.dtype)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, key, value, col_ok[None, :], FP32_DOT)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offsets = (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
