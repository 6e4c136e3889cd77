"""The attention backend interface: chosen once, prepared once per forward, run once per layer.

Contract of every backend (the reference in `engine.attention.reference` defines the numbers):
- `prepare(segments, caches)` runs once per forward, before the first layer, and builds whatever the
  backend needs for the whole batch (slot ids, block tables, tiles) once per cache group; it reads
  only the segments and the caches' shapes, never their contents.
- `forward(q, k, v, cache, metadata)` runs once per layer: q (T, heads, d), k and v (T, kv_heads, d)
  in segment order -> (T, heads, d). Causal segments first write their K/V into `cache`, then attend to
  cache positions [first_visible, end) with kv <= q (sliding layers: kv > q - W); bidirectional
  segments attend to cache positions [first_visible, start) plus their own K/V and write nothing.
  Scale 1.0, GQA (query head h reads kv head h // (heads / kv_heads)).

`BoundAttention` pairs a backend with one forward's metadata; `ForwardBatch` carries it to the layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import Tensor

from engine.attention.types import LayerCache, Segment

Metadata = TypeVar("Metadata")


class AttentionBackend(ABC, Generic[Metadata]):
    """One way to compute paged attention (see the module docstring for the contract)."""

    name: str

    @abstractmethod
    def prepare(self, segments: list[Segment], caches: list[LayerCache]) -> Metadata:
        """Everything the layers of one forward share, built once (per cache group) from the segments."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, metadata: Metadata) -> Tensor:
        """One layer: q (T, heads, d), k/v (T, kv_heads, d) -> (T, heads, d); causal K/V into `cache`."""

    def bind(self, segments: list[Segment], caches: list[LayerCache]) -> BoundAttention[Metadata]:
        """`prepare` for one forward, paired with this backend."""
        return BoundAttention(self, self.prepare(segments, caches))


@dataclass(frozen=True)
class BoundAttention(Generic[Metadata]):
    """One forward's attention: a backend and the metadata it prepared for the batch."""

    backend: AttentionBackend[Metadata]
    metadata: Metadata

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache) -> Tensor:
        return self.backend.forward(q, k, v, cache, self.metadata)
