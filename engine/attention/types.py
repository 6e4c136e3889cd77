"""The attention data shared by the model, the backends and the kernels (a leaf: imports only torch).

A *segment* is a run of consecutive positions of one request:
- causal (encoder mode: a prompt chunk or a committed canvas): its K/V are written into the cache at
  its positions, and token p attends to every cached or new position <= p (sliding layers: only
  positions > p - W);
- bidirectional (decoder mode: a canvas being denoised): it attends to the request's cached positions
  (sliding layers: the last W - 1 of them) plus the whole segment, and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    @property
    def head_dim(self) -> int:
        return int(self.key.shape[-1])


def slot_ids(block_table: list[int], start: int, end: int, block_size: int, device: torch.device) -> Tensor:
    """Flat cache slots of positions [start, end).

    Example, block_size 4, table [7, 2]: position 5 is in logical block 1 -> physical 2, offset 1,
    so slot 2 * 4 + 1 = 9.
    """
    positions = torch.arange(start, end, device=device)
    table = torch.tensor(block_table, dtype=torch.long, device=device)
    return table[positions // block_size] * block_size + positions % block_size


def first_visible(segment: Segment, window: int | None) -> int:
    """The lowest cache position any query of the segment may read.

    Full layers: 0. Sliding layers: the segment's first query at `start_pos` sees `window - 1` earlier
    positions, e.g. W = 8, start 20 -> 13. Bidirectional canvases read the same `W - 1` positions.
    """
    return 0 if window is None else max(0, segment.start_pos - window + 1)


def group_caches(caches: list[LayerCache]) -> dict[str, LayerCache]:
    """One representative cache per group (its block size and window are the group's), in layer order."""
    groups: dict[str, LayerCache] = {}
    for cache in caches:
        groups.setdefault(cache.group, cache)
    return groups
