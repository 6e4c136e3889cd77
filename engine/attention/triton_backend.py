"""The Triton attention backend: one kernel launch per layer for the whole mixed batch.

`prepare` packs the batch layout (`engine.kernels.paged_attention.build_metadata`: tiles, segment
table, block tables, causal write slots) once per forward for each cache group and query tile height;
every layer of the group reuses it. Importing this module imports triton: `engine.attention.selection`
imports it only when this backend is chosen. The contract is `engine.attention.base`'s.
"""

from __future__ import annotations

from torch import Tensor

from engine.attention.base import AttentionBackend
from engine.attention.types import LayerCache, Segment
from engine.kernels.paged_attention import BatchMetadata, block_shape, build_metadata, paged_attention_with

TritonMetadata = dict[tuple[str, int], BatchMetadata]
"""(cache group, BLOCK_M) -> the batch layout for the layers of that group and head dim."""


def _key(cache: LayerCache) -> tuple[str, int]:
    return cache.group, block_shape(cache.head_dim, cache.key.device)[0]


class TritonAttention(AttentionBackend[TritonMetadata]):
    """`engine.kernels.paged_attention` over metadata prepared once per forward."""

    name = "triton"

    def prepare(self, segments: list[Segment], caches: list[LayerCache]) -> TritonMetadata:
        metadata: TritonMetadata = {}
        for cache in caches:
            key = _key(cache)
            if key not in metadata:
                metadata[key] = build_metadata(
                    segments, cache.group, cache.block_size, key[1], cache.key.device
                )
        return metadata

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, metadata: TritonMetadata) -> Tensor:
        return paged_attention_with(q, k, v, cache, metadata[_key(cache)])
