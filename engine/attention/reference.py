"""The reference attention backend in plain torch: SDPA per segment over slots gathered from the cache.

Correct first, used on the CPU and as the oracle for faster backends (tests/kernels). `prepare` builds
each segment's cache slots and causal mask once per cache group; every layer of that group reuses
them. The contract is `engine.attention.base`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.attention.base import AttentionBackend
from engine.attention.types import LayerCache, Segment, first_visible, group_caches, slot_ids


@dataclass(frozen=True)
class SegmentPlan:
    """One segment's cache access in one group, as device tensors.

    Causal: `write_slots` (n,) for its own K/V, `read_slots` of positions [first_visible, end) and
    `mask` (n, m) True where a query may attend. Bidirectional: `read_slots` of [first_visible, start),
    no writes, no mask (it sees all of them and its whole self).
    """

    num_tokens: int
    read_slots: Tensor
    write_slots: Tensor | None = None
    mask: Tensor | None = None


ReferenceMetadata = dict[str, list[SegmentPlan]]
"""Cache group name -> one plan per segment, in token order."""


def plan_segment(segment: Segment, cache: LayerCache) -> SegmentPlan:
    """The slots and mask of `segment` in `cache`'s group (block size and window)."""
    table = segment.block_tables[cache.group]
    device = cache.key.device
    lo = first_visible(segment, cache.window)
    if not segment.is_causal:
        return SegmentPlan(
            segment.num_tokens, slot_ids(table, lo, segment.start_pos, cache.block_size, device)
        )
    write = slot_ids(table, segment.start_pos, segment.end_pos, cache.block_size, device)
    read = slot_ids(table, lo, segment.end_pos, cache.block_size, device)
    q_pos = torch.arange(segment.start_pos, segment.end_pos, device=device)
    mask = causal_mask(q_pos, torch.arange(lo, segment.end_pos, device=device), cache.window)
    return SegmentPlan(segment.num_tokens, read, write, mask)


def causal_mask(q_pos: Tensor, kv_pos: Tensor, window: int | None) -> Tensor:
    """(n, m) bool, True where query may attend: kv <= q, and kv > q - W on sliding layers."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - window
    return mask


def write_slots(cache: LayerCache, slots: Tensor, key: Tensor, value: Tensor) -> None:
    """Store key/value (n, kv_heads, d) at flat cache `slots` (n,)."""
    cache.key.view(-1, *cache.key.shape[2:])[slots] = key.to(cache.key.dtype)
    cache.value.view(-1, *cache.value.shape[2:])[slots] = value.to(cache.value.dtype)


def read_slots(cache: LayerCache, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Cached key/value at flat `slots` (m,): each (m, kv_heads, d)."""
    key = cache.key.view(-1, *cache.key.shape[2:])[slots]
    value = cache.value.view(-1, *cache.value.shape[2:])[slots]
    return key, value


def read_kv(cache: LayerCache, table: list[int], start: int, end: int) -> tuple[Tensor, Tensor]:
    """Cached key/value of positions [start, end): each (end - start, kv_heads, d)."""
    return read_slots(cache, slot_ids(table, start, end, cache.block_size, cache.key.device))


def segment_attention(q: Tensor, k: Tensor, v: Tensor, plan: SegmentPlan, cache: LayerCache) -> Tensor:
    """Attention of one segment. q (n, heads, d); k, v (n, kv_heads, d) are the segment's own.

    Causal segments first write their K/V, then read back [first_visible, end). Scale is 1.0 (the
    model's q/k norms replace 1/sqrt(d)). Returns (n, heads, d).
    """
    if plan.write_slots is not None:
        write_slots(cache, plan.write_slots, k, v)
        keys, values = read_slots(cache, plan.read_slots)
    else:
        past_k, past_v = read_slots(cache, plan.read_slots)
        keys = torch.cat([past_k, k.to(past_k.dtype)])
        values = torch.cat([past_v, v.to(past_v.dtype)])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (1, heads, n, d)
        keys.to(q.dtype).transpose(0, 1)[None],  # (1, kv_heads, m, d)
        values.to(q.dtype).transpose(0, 1)[None],
        attn_mask=plan.mask,
        scale=1.0,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)  # (n, heads, d)


class TorchAttention(AttentionBackend[ReferenceMetadata]):
    """SDPA per segment (the reference)."""

    name = "torch"

    def prepare(self, segments: list[Segment], caches: list[LayerCache]) -> ReferenceMetadata:
        return {
            group: [plan_segment(s, cache) for s in segments] for group, cache in group_caches(caches).items()
        }

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, metadata: ReferenceMetadata
    ) -> Tensor:
        outputs = []
        start = 0
        for plan in metadata[cache.group]:
            end = start + plan.num_tokens
            outputs.append(segment_attention(q[start:end], k[start:end], v[start:end], plan, cache))
            start = end
        return torch.cat(outputs)


def batch_attention(q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cache: LayerCache) -> Tensor:
    """One-shot reference for a flat batch: q (T, heads, d), k/v (T, kv_heads, d), segments in token order."""
    return TorchAttention().bind(segments, [cache])(q, k, v, cache)
