"""The varlen paged-attention kernel against `batch_attention` (the torch reference) on mixed batches."""

from __future__ import annotations

import pytest
import torch

from engine.attention.reference import TorchAttention, batch_attention
from engine.attention.selection import select_attention_backend
from engine.attention.triton_backend import TritonAttention
from engine.attention.types import LayerCache, Segment
from engine.kernels import dispatch
from engine.kernels.paged_attention import block_shape, build_metadata, paged_attention

# (num_tokens, start_pos, is_causal, request): causal work first, as the runner orders it. Request 0's
# canvas starts where its prompt chunk ends, so it reads K/V written in the same launch.
MIXED = [
    (13, 7, True, 0),
    (5, 0, True, 1),
    (16, 20, False, 0),
    (9, 30, False, 2),
    (6, 0, False, 3),
    (18, 3, False, 1),
]


def make_case(
    layout: list[tuple[int, int, bool, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Segment], LayerCache]:
    """Random q/k/v, a random-filled cache and shuffled (non-contiguous) per-request block tables."""
    gen = torch.Generator().manual_seed(seed)
    ends: dict[int, int] = {}
    for n, start, _, request in layout:
        ends[request] = max(ends.get(request, 0), start + n)
    needs = {r: -(-end // block_size) + 1 for r, end in ends.items()}
    num_blocks = sum(needs.values()) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables: dict[int, list[int]] = {}
    for r, need in needs.items():
        tables[r], order = order[:need], order[need:]
    segments = [Segment(n, start, causal, {"g": tables[r]}) for n, start, causal, r in layout]
    total = sum(n for n, *_ in layout)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    cache = LayerCache(
        torch.randn(shape, generator=gen).to(dtype).to(device),
        torch.randn(shape, generator=gen).to(dtype).to(device),
        "g",
        window,
    )
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype).to(device)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    return q, k, v, segments, cache


def clone(cache: LayerCache) -> LayerCache:
    return LayerCache(cache.key.clone(), cache.value.clone(), cache.group, cache.window)


def check(q, k, v, segments, cache, atol: float) -> None:  # type: ignore[no-untyped-def]
    ref_cache, kernel_cache = clone(cache), clone(cache)
    expected = batch_attention(q, k, v, segments, ref_cache)
    got = paged_attention(q, k, v, segments, kernel_cache)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(kernel_cache.key, ref_cache.key, atol=0, rtol=0)
    torch.testing.assert_close(kernel_cache.value, ref_cache.value, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "window"),
    [
        (4, 2, 16, 4, None),
        (4, 2, 16, 4, 8),
        (4, 1, 32, 8, 5),
        (2, 2, 32, 8, None),
    ],
)
def test_mixed_batch_matches_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int, window: int | None, device: torch.device
) -> None:
    case = make_case(MIXED, heads, kv_heads, head_dim, block_size, window, torch.float32, device)
    check(*case, atol=1e-4)


def test_bf16_long_segments_cross_tiles(device: torch.device) -> None:
    """Segments longer than a tile, a window shorter than one: tile-level kv bounds must stay exact."""
    layout = [(37, 0, True, 0), (21, 40, True, 1), (33, 37, False, 0), (19, 61, False, 1)]
    case = make_case(layout, 4, 2, 16, 8, 6, torch.bfloat16, device, seed=1)
    check(*case, atol=2e-2)


def test_metadata_tiles_and_writes() -> None:
    segments = [Segment(20, 4, True, {"g": [3, 1]}), Segment(8, 0, False, {"g": [5]})]
    meta = build_metadata(segments, "g", 16, 16, torch.device("cpu"))
    assert meta.tile_seg.tolist() == [0, 0, 1] and meta.tile_q0.tolist() == [0, 16, 0]
    assert meta.seg_q_start.tolist() == [0, 20] and meta.block_tables.tolist() == [[3, 1], [5, 0]]
    assert meta.write_rows.tolist() == list(range(20))
    # position 4 -> block 3 slot 4 (52); position 16 -> logical block 1 -> physical 1 (16)
    assert meta.write_slots[0] == 52 and meta.write_slots[12] == 16


def test_attend_dispatches_to_kernel(device: torch.device) -> None:
    case = make_case(MIXED[:3], 2, 1, 16, 4, 8, torch.float32, device, seed=2)
    q, k, v, segments, cache = case
    expected = batch_attention(q, k, v, segments, clone(cache))
    with dispatch.force(True):
        backend = select_attention_backend(device)
    kernel_cache = clone(cache)
    got = backend.bind(segments, [kernel_cache])(q, k, v, kernel_cache)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_backend_is_chosen_by_device_and_force() -> None:
    """The reference on the CPU, Triton when forced; the choice is made once, not per layer."""
    cpu = torch.device("cpu")
    assert isinstance(select_attention_backend(cpu), TorchAttention)
    with dispatch.force(True):
        assert isinstance(select_attention_backend(cpu), TritonAttention)
    with dispatch.force(False):
        assert isinstance(select_attention_backend(torch.device("cuda")), TorchAttention)


def test_prepared_metadata_serves_every_layer_of_a_group(device: torch.device) -> None:
    """One prepare per forward: two layers of one group reuse the same metadata, and each layer's result
    matches the one-shot reference (the second layer reads what the first wrote in its own cache)."""
    q, k, v, segments, cache = make_case(MIXED, 4, 2, 16, 4, 8, torch.float32, device, seed=4)
    caches = [clone(cache), clone(cache)]
    bound = TritonAttention().bind(segments, caches)
    assert list(bound.metadata) == [("g", block_shape(16, device)[0])]
    for layer_cache in caches:
        ref_cache = clone(cache)
        expected = batch_attention(q, k, v, segments, ref_cache)
        torch.testing.assert_close(bound(q, k, v, layer_cache), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer_cache.key, ref_cache.key, atol=0, rtol=0)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(4, 2, 256, 8), (8, 1, 512, None)])
def test_real_head_dims(
    heads: int, kv_heads: int, head_dim: int, window: int | None, device: torch.device
) -> None:
    """The 26B-A4B head dims (256 sliding, GQA 2; 512 full, GQA 8) on a small batch."""
    layout = [(9, 0, True, 0), (16, 9, False, 0), (5, 3, False, 1)]
    case = make_case(layout, heads, kv_heads, head_dim, 4, window, torch.bfloat16, device, seed=3)
    check(*case, atol=2e-2)


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts(seed: int, device: torch.device) -> None:
    """Random mixes of prompt chunks and canvases over a few requests, random windows and GQA."""
    gen = torch.Generator().manual_seed(100 + seed)
    layout: list[tuple[int, int, bool, int]] = []
    for request in range(4):
        start = int(torch.randint(0, 24, (1,), generator=gen))
        n = int(torch.randint(1, 24, (1,), generator=gen))
        layout.append((n, start, bool(torch.rand(1, generator=gen) < 0.5), request))
    layout.sort(key=lambda s: not s[2])  # causal work first
    window = [None, 3, 7, 16][seed]
    heads, kv_heads = [(4, 4), (4, 2), (8, 2), (6, 3)][seed]
    case = make_case(layout, heads, kv_heads, 16, [4, 8, 16, 5][seed], window, torch.float32, device, seed)
    check(*case, atol=1e-4)
