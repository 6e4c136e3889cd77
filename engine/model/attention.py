"""Attention over a flat batch of segments from many requests, reading and writing a paged KV cache.

A *segment* is a run of consecutive positions of one request:
- causal (encoder mode: a prompt chunk or a committed canvas): its K/V are written into the cache at
  its positions, and token p attends to every cached or new position <= p (sliding layers: only
  positions > p - W);
- bidirectional (decoder mode: a canvas being denoised): it attends to the request's cached positions
  (sliding layers: the last W - 1 of them) plus the whole segment, and writes nothing.

This is the reference path in plain torch (SDPA per segment): correct first, used on CPU and as the
oracle for faster kernels. `attend` sends the batch to the Triton kernel instead on CUDA
(`engine.kernels.paged_attention`: one launch per layer for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kernels.dispatch import use_kernels


@dataclass(frozen=True)
class Segment:
    """One request's slice of the flat batch (no tensors; built by the runner).

    `start_pos` is the position of the segment's first token, which equals the number of positions of
    this request already in the cache. `block_tables` maps each cache group name to the request's
    physical block ids (logical block i holds positions [i * block_size, (i + 1) * block_size)).
    """

    num_tokens: int
    start_pos: int
    is_causal: bool
    block_tables: dict[str, list[int]]

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class LayerCache:
    """One layer's paged K/V: `key`, `value` of shape (num_blocks, block_size, num_kv_heads, head_dim)."""

    key: Tensor
    value: Tensor
    group: str
    window: int | None

    @property
    def block_size(self) -> int:
        return int(self.key.shape[1])


def slot_ids(block_table: list[int], start: int, end: int, block_size: int, device: torch.device) -> Tensor:
    """Flat cache slots of positions [start, end).

    Example, block_size 4, table [7, 2]: position 5 is in logical block 1 -> physical 2, offset 1,
    so slot 2 * 4 + 1 = 9.
    """
    positions = torch.arange(start, end, device=device)
    table = torch.tensor(block_table, dtype=torch.long, device=device)
    return table[positions // block_size] * block_size + positions % block_size


def write_kv(cache: LayerCache, table: list[int], start: int, key: Tensor, value: Tensor) -> None:
    """Store key/value (n, kv_heads, d) at positions [start, start + n)."""
    slots = slot_ids(table, start, start + key.shape[0], cache.block_size, key.device)
    cache.key.view(-1, *cache.key.shape[2:])[slots] = key.to(cache.key.dtype)
    cache.value.view(-1, *cache.value.shape[2:])[slots] = value.to(cache.value.dtype)


def read_kv(cache: LayerCache, table: list[int], start: int, end: int) -> tuple[Tensor, Tensor]:
    """Cached key/value of positions [start, end): each (end - start, kv_heads, d)."""
    slots = slot_ids(table, start, end, cache.block_size, cache.key.device)
    key = cache.key.view(-1, *cache.key.shape[2:])[slots]
    value = cache.value.view(-1, *cache.value.shape[2:])[slots]
    return key, value


def first_visible(segment: Segment, window: int | None) -> int:
    """The lowest cache position any query of the segment may read.

    Full layers: 0. Sliding layers: the segment's first query at `start_pos` sees `window - 1` earlier
    positions, e.g. W = 8, start 20 -> 13. Bidirectional canvases read the same `W - 1` positions.
    """
    return 0 if window is None else max(0, segment.start_pos - window + 1)


def causal_mask(q_pos: Tensor, kv_pos: Tensor, window: int | None) -> Tensor:
    """(n, m) bool, True where query may attend: kv <= q, and kv > q - W on sliding layers."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - window
    return mask


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segment: Segment, cache: LayerCache) -> Tensor:
    """Attention of one segment. q (n, heads, d); k, v (n, kv_heads, d) are the segment's own.

    Causal segments first write their K/V, then read back [first_visible, end). Scale is 1.0 (the
    model's q/k norms replace 1/sqrt(d)). Returns (n, heads, d).
    """
    table = segment.block_tables[cache.group]
    lo = first_visible(segment, cache.window)
    mask: Tensor | None = None
    if segment.is_causal:
        write_kv(cache, table, segment.start_pos, k, v)
        keys, values = read_kv(cache, table, lo, segment.end_pos)
        q_pos = torch.arange(segment.start_pos, segment.end_pos, device=q.device)
        mask = causal_mask(q_pos, torch.arange(lo, segment.end_pos, device=q.device), cache.window)
    else:
        past_k, past_v = read_kv(cache, table, lo, segment.start_pos)
        keys = torch.cat([past_k, k.to(past_k.dtype)])
        values = torch.cat([past_v, v.to(past_v.dtype)])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (1, heads, n, d)
        keys.to(q.dtype).transpose(0, 1)[None],  # (1, kv_heads, m, d)
        values.to(q.dtype).transpose(0, 1)[None],
        attn_mask=mask,
        scale=1.0,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)  # (n, heads, d)


def attend(q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cache: LayerCache) -> Tensor:
    """`batch_attention`, or on CUDA the Triton kernel with the same contract (`engine.kernels`)."""
    if use_kernels(q.device):
        from engine.kernels.paged_attention import paged_attention  # imports triton: only when used

        return paged_attention(q, k, v, segments, cache)
    return batch_attention(q, k, v, segments, cache)


def batch_attention(q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cache: LayerCache) -> Tensor:
    """Attention for a flat batch: q (T, heads, d), k/v (T, kv_heads, d), segments in token order."""
    outputs = []
    start = 0
    for segment in segments:
        end = start + segment.num_tokens
        outputs.append(segment_attention(q[start:end], k[start:end], v[start:end], segment, cache))
        start = end
    return torch.cat(outputs)
