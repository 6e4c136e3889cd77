"""The reference attention backend in plain torch: SDPA over slots gathered from the cache.

Correct first, used on the CPU and as the oracle for faster backends (tests/kernels). `prepare` builds
each segment's cache slots and causal mask once per cache group; every layer of that group reuses
them. Consecutive bidirectional segments of one length (the canvases of a denoise step) run as one
batched SDPA call per layer (`DecoderRun`), their cached slots padded to the longest and masked, so a
step's attention costs one gather and one call per layer instead of one per canvas. The contract is
`engine.attention.base`'s.
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


@dataclass(frozen=True)
class DecoderRun:
    """B consecutive bidirectional segments of n tokens each, attended in one batched call.

    `read_slots` (B, m) holds each segment's cached slots of [first_visible, start), left-aligned and
    padded to the longest; `key_mask` (B, 1, 1, m + n) is True where a key is real (None when no row
    is padded). Keys are the cached ones followed by the segment's own n.
    """

    num_segments: int
    num_tokens: int
    read_slots: Tensor
    key_mask: Tensor | None

    @property
    def total_tokens(self) -> int:
        return self.num_segments * self.num_tokens


MAX_PADDING = 0.25
"""A run of canvases is batched only if padding adds at most this fraction to the keys it reads."""

ReferenceMetadata = dict[str, list[SegmentPlan | DecoderRun]]
"""Cache group name -> plans in token order: one per causal or lone segment, one per decoder run."""


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


def plan_group(segments: list[Segment], cache: LayerCache) -> list[SegmentPlan | DecoderRun]:
    """The plans of one cache group: runs of >= 2 consecutive bidirectional segments of one length
    become a `DecoderRun` when their padding stays within `MAX_PADDING`; the rest one plan each."""
    plans: list[SegmentPlan | DecoderRun] = []
    i = 0
    while i < len(segments):
        j = i + 1
        if not segments[i].is_causal:
            while j < len(segments) and _same_run(segments[i], segments[j]):
                j += 1
        run = plan_run(segments[i:j], cache) if j - i >= 2 else None
        plans.extend([run] if run is not None else [plan_segment(s, cache) for s in segments[i:j]])
        i = j
    return plans


def _same_run(first: Segment, other: Segment) -> bool:
    return not other.is_causal and other.num_tokens == first.num_tokens


def plan_run(segments: list[Segment], cache: LayerCache) -> DecoderRun | None:
    """One `DecoderRun` for bidirectional segments of one length, or None when padding would waste
    more than `MAX_PADDING` of the keys read."""
    device = cache.key.device
    reads = [
        slot_ids(
            s.block_tables[cache.group], first_visible(s, cache.window), s.start_pos, cache.block_size, device
        )
        for s in segments
    ]
    lengths = [int(r.shape[0]) for r in reads]
    n, longest = segments[0].num_tokens, max(lengths)
    if len(segments) * (longest + n) > (1 + MAX_PADDING) * sum(length + n for length in lengths):
        return None
    slots = torch.zeros((len(segments), longest), dtype=torch.long, device=device)  # (B, m), pad: slot 0
    for row, read in enumerate(reads):
        slots[row, : read.shape[0]] = read
    mask = None
    if min(lengths) < longest:
        key_pos = torch.arange(longest + n, device=device)  # (m + n,)
        cached = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
        mask = ((key_pos < cached) | (key_pos >= longest))[:, None, None, :]  # (B, 1, 1, m + n)
    return DecoderRun(len(segments), n, slots, mask)


def run_attention(q: Tensor, k: Tensor, v: Tensor, run: DecoderRun, cache: LayerCache) -> Tensor:
    """Attention of a decoder run. q (B * n, heads, d); k, v (B * n, kv_heads, d) -> (B * n, heads, d)."""
    b, n = run.num_segments, run.num_tokens
    m = run.read_slots.shape[1]
    past_k, past_v = read_slots(cache, run.read_slots.flatten())  # (B * m, kv_heads, d) each
    past_k, past_v = past_k.view(b, m, *k.shape[1:]), past_v.view(b, m, *v.shape[1:])  # (B, m, kvh, d)
    keys = torch.cat([past_k, k.to(past_k.dtype).reshape(b, n, *k.shape[1:])], dim=1)  # (B, m + n, kvh, d)
    values = torch.cat([past_v, v.to(past_v.dtype).reshape(b, n, *v.shape[1:])], dim=1)
    out = F.scaled_dot_product_attention(
        q.reshape(b, n, *q.shape[1:]).transpose(1, 2),  # (B, heads, n, d)
        keys.to(q.dtype).transpose(1, 2),  # (B, kv_heads, m + n, d)
        values.to(q.dtype).transpose(1, 2),
        attn_mask=run.key_mask,
        scale=1.0,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(q.shape)  # (B * n, heads, d)


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
        return {group: plan_group(segments, cache) for group, cache in group_caches(caches).items()}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, metadata: ReferenceMetadata
    ) -> Tensor:
        outputs = []
        start = 0
        for plan in metadata[cache.group]:
            if isinstance(plan, DecoderRun):
                end = start + plan.total_tokens
                outputs.append(run_attention(q[start:end], k[start:end], v[start:end], plan, cache))
            else:
                end = start + plan.num_tokens
                outputs.append(segment_attention(q[start:end], k[start:end], v[start:end], plan, cache))
            start = end
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def batch_attention(q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cache: LayerCache) -> Tensor:
    """One-shot reference for a flat batch: q (T, heads, d), k/v (T, kv_heads, d), segments in token order."""
    return TorchAttention().bind(segments, [cache])(q, k, v, cache)
