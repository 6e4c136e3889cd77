"""The paged K/V tensors of every layer, one pool per cache group.

Sliding and full layers store K/V of different shapes, so each layer kind is its own cache group
with its own block pool (see `engine.kv_cache`): group "sliding" (windowed) and group "full".
"""

from __future__ import annotations

import torch

from engine.attention.types import LayerCache
from engine.config import ModelConfig
from engine.kv_cache import CacheGroupSpec


def cache_groups(config: ModelConfig, num_blocks: dict[str, int]) -> list[CacheGroupSpec]:
    """One group per layer kind present in the model; sliding groups carry the window."""
    kinds = sorted(set(config.layer_kinds))
    return [
        CacheGroupSpec(name=kind, num_blocks=num_blocks[kind], window=_window(config, kind)) for kind in kinds
    ]


def _window(config: ModelConfig, kind: str) -> int | None:
    return config.sliding_window if kind == "sliding" else None


def bytes_per_block(config: ModelConfig, kind: str, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block across every layer of `kind`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = [
        2 * block_size * s.num_kv_heads * s.head_dim * itemsize for s in config.layers if s.kind == kind
    ]
    return sum(per_layer)


def allocate_layer_caches(
    config: ModelConfig,
    num_blocks: dict[str, int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[LayerCache]:
    """Zeroed (num_blocks, block_size, kv_heads, head_dim) K and V for each layer, in layer order."""
    caches = []
    for spec in config.layers:
        shape = (num_blocks[spec.kind], block_size, spec.num_kv_heads, spec.head_dim)
        caches.append(
            LayerCache(
                key=torch.zeros(shape, dtype=dtype, device=device),
                value=torch.zeros(shape, dtype=dtype, device=device),
                group=spec.kind,
                window=_window(config, spec.kind),
            )
        )
    return caches
