"""Tests for engine.kv_cache: block pools, block tables and sliding-window release (plain ints)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import (
    NULL_BLOCK,
    BlockPool,
    CacheGroupSpec,
    KVCacheManager,
    NoFreeBlocks,
    first_live_block,
    num_blocks_for,
)


def make_manager(block_size: int, window: int, num_full: int = 64, num_sliding: int = 64) -> KVCacheManager:
    groups = [CacheGroupSpec("full", num_full, None), CacheGroupSpec("sliding", num_sliding, window)]
    return KVCacheManager(groups, block_size)


def test_num_blocks_for_is_ceil_division() -> None:
    assert [num_blocks_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    assert num_blocks_for(5, 1) == 5
    with pytest.raises(ValueError):
        num_blocks_for(-1, 16)
    with pytest.raises(ValueError):
        num_blocks_for(1, 0)


def test_first_live_block_worked_example() -> None:
    # oldest readable position 2000 - 1024 + 1 = 977 lies in block 61 = [976, 992)
    assert first_live_block(2000, 1024, 16) == 61
    assert first_live_block(10, 1024, 16) == 0


def test_specs_and_manager_reject_bad_config() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        CacheGroupSpec("full", 0, None)
    with pytest.raises(ValueError, match="window"):
        CacheGroupSpec("sliding", 4, 0)
    with pytest.raises(ValueError, match="unique"):
        KVCacheManager([CacheGroupSpec("a", 4), CacheGroupSpec("a", 4)], 16)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager([CacheGroupSpec("a", 4)], 0)
    with pytest.raises(ValueError):
        KVCacheManager([], 16)


def test_block_pool_allocates_and_frees() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert (pool.num_free, pool.num_used) == (1, 3)
    pool.free([1])
    with pytest.raises(NoFreeBlocks):
        pool.allocate(3)
    assert pool.num_free == 2
    assert pool.allocate(2) == [3, 1]


def test_block_pool_rejects_double_and_foreign_free() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    for bad in ([0], [7], [-1]):
        with pytest.raises(ValueError):
            pool.free(bad)
    pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([0, 0])
    assert pool.num_used == 2


def test_allocate_and_free() -> None:
    manager = make_manager(block_size=16, window=1024, num_full=8, num_sliding=8)
    assert manager.can_allocate("a", 40)
    manager.allocate("a", 40)
    assert "a" in manager.request_ids
    assert manager.request_ids == ("a",)
    assert manager.block_table("a", "full") == [0, 1, 2]
    assert manager.block_table("a", "sliding") == [0, 1, 2]
    assert manager.num_used_blocks("full") == 3
    manager.free("a")
    assert "a" not in manager.request_ids
    assert manager.num_free_blocks("full") == manager.num_free_blocks("sliding") == 8
    manager.free("a")  # idempotent


def test_growth_is_incremental() -> None:
    manager = make_manager(block_size=16, window=1024)
    manager.allocate("a", 17)
    first = {g: manager.block_table("a", g) for g in manager.group_names}
    assert all(len(table) == 2 for table in first.values())
    manager.allocate("b", 16)
    manager.allocate("a", 40)
    for group in manager.group_names:
        table = manager.block_table("a", group)
        assert len(table) == 3
        assert table[:2] == first[group]
        assert table[2] not in manager.block_table("b", group)
    manager.allocate("a", 5)  # smaller than covered: no-op
    assert len(manager.block_table("a", "full")) == 3
    assert manager.num_used_blocks("full") == 4


def test_allocate_zero_tokens_registers_an_empty_table() -> None:
    manager = make_manager(block_size=16, window=32)
    manager.allocate("a", 0)
    assert "a" in manager.request_ids
    assert manager.block_table("a", "full") == []


def test_failed_allocate_changes_nothing() -> None:
    manager = make_manager(block_size=4, window=100, num_full=4, num_sliding=2)
    manager.allocate("a", 8)
    assert not manager.can_allocate("b", 4)
    with pytest.raises(NoFreeBlocks, match=r"'sliding' needs 1 blocks but 0 of 2 are free"):
        manager.allocate("b", 4)
    assert "b" not in manager.request_ids
    assert manager.num_free_blocks("full") == 2
    with pytest.raises(NoFreeBlocks, match="sliding"):
        manager.allocate("a", 12)
    assert manager.block_table("a", "full") == [0, 1]
    assert manager.block_table("a", "sliding") == [0, 1]
    assert manager.num_used_blocks("full") == 2


def test_failure_message_names_every_short_group() -> None:
    manager = make_manager(block_size=4, window=100, num_full=1, num_sliding=2)
    with pytest.raises(NoFreeBlocks) as info:
        manager.allocate("a", 12)
    assert "'full' needs 3 blocks but 1 of 1" in str(info.value)
    assert "'sliding' needs 3 blocks but 2 of 2" in str(info.value)


@pytest.mark.parametrize(
    ("num_computed", "expected_sliding"),
    [
        # block_size 4, W 6: oldest readable position is num_computed - 5
        (5, [0, 1, 2, 3]),  # reads from 0
        (8, [0, 1, 2, 3]),  # reads from 3: block 0 = [0, 4) still holds position 3
        (9, [NULL_BLOCK, 1, 2, 3]),  # reads from 4: block 0 is dead
        (12, [NULL_BLOCK, 1, 2, 3]),  # reads from 7
        (13, [NULL_BLOCK, NULL_BLOCK, 2, 3]),  # reads from 8
        (16, [NULL_BLOCK, NULL_BLOCK, 2, 3]),  # reads from 11
    ],
)
def test_release_window_not_multiple_of_block_size(num_computed: int, expected_sliding: list[int]) -> None:
    manager = make_manager(block_size=4, window=6)
    manager.allocate("a", 16)
    num_freed = manager.release_out_of_window("a", num_computed)
    assert manager.block_table("a", "sliding") == expected_sliding
    assert num_freed == expected_sliding.count(NULL_BLOCK)
    assert manager.block_table("a", "full") == [0, 1, 2, 3]
    assert manager.num_used_blocks("sliding") == 4 - num_freed
    assert manager.num_used_blocks("full") == 4


def test_release_with_block_size_one() -> None:
    manager = make_manager(block_size=1, window=3)
    manager.allocate("a", 5)
    assert manager.release_out_of_window("a", 5) == 3  # reads from 5 - 3 + 1 = 3
    assert manager.block_table("a", "sliding") == [NULL_BLOCK] * 3 + [3, 4]
    assert manager.release_out_of_window("a", 6) == 1
    assert manager.block_table("a", "sliding") == [NULL_BLOCK] * 4 + [4]


def test_release_worked_example_from_docstring() -> None:
    manager = make_manager(block_size=16, window=1024, num_full=125, num_sliding=125)
    manager.allocate("a", 2000)
    assert manager.release_out_of_window("a", 2000) == 61
    table = manager.block_table("a", "sliding")
    assert table[:61] == [NULL_BLOCK] * 61
    assert table[61:] == list(range(61, 125))


def test_release_is_monotonic_and_idempotent() -> None:
    manager = make_manager(block_size=4, window=4)
    manager.allocate("a", 16)
    assert manager.release_out_of_window("a", 11) == 2
    assert manager.release_out_of_window("a", 11) == 0
    assert manager.release_out_of_window("a", 3) == 0
    assert manager.block_table("a", "sliding") == [NULL_BLOCK, NULL_BLOCK, 2, 3]


def test_release_ahead_of_allocation_leaves_null_entries() -> None:
    manager = make_manager(block_size=4, window=2)
    manager.allocate("a", 4)
    assert manager.release_out_of_window("a", 20) == 1  # reads from 19: blocks 0..3 are dead
    manager.allocate("a", 24)
    table = manager.block_table("a", "sliding")
    assert table[:4] == [NULL_BLOCK] * 4
    assert len(table) == 6 and NULL_BLOCK not in table[4:]
    assert manager.num_used_blocks("sliding") == 2
    assert len(manager.block_table("a", "full")) == 6


def test_small_sliding_pool_serves_a_long_request() -> None:
    manager = make_manager(block_size=4, window=4, num_full=32, num_sliding=3)
    for num_tokens in range(4, 121, 4):
        manager.allocate("a", num_tokens)
        manager.release_out_of_window("a", num_tokens)
        assert manager.num_used_blocks("sliding") <= 3
    assert manager.num_used_blocks("full") == 30


def test_freed_request_can_be_allocated_again() -> None:
    manager = make_manager(block_size=4, window=4, num_full=8, num_sliding=8)
    manager.allocate("a", 16)
    manager.release_out_of_window("a", 16)
    manager.free("a")
    assert manager.num_used_blocks("full") == manager.num_used_blocks("sliding") == 0
    manager.allocate("a", 32)
    assert NULL_BLOCK not in manager.block_table("a", "sliding")
    assert sorted(manager.block_table("a", "full")) == list(range(8))


def test_usage() -> None:
    manager = make_manager(block_size=4, window=100, num_full=4, num_sliding=8)
    assert manager.usage() == 0.0
    manager.allocate("a", 8)
    assert manager.usage_by_group() == {"full": 0.5, "sliding": 0.25}
    assert manager.usage() == 0.5
    manager.allocate("b", 8)
    assert manager.usage() == 1.0
    manager.free("a")
    manager.free("b")
    assert manager.usage() == 0.0


def test_unknown_request_and_group() -> None:
    manager = make_manager(block_size=4, window=4)
    assert manager.block_table("nope", "full") == []
    assert manager.release_out_of_window("nope", 100) == 0
    assert "nope" not in manager.request_ids
    manager.free("nope")
    assert manager.request_ids == ()
    with pytest.raises(KeyError, match="unknown cache group"):
        manager.block_table("nope", "other")
    with pytest.raises(KeyError):
        manager.num_free_blocks("other")
    with pytest.raises(ValueError):
        manager.release_out_of_window("nope", -1)


REQUEST_IDS = ("r0", "r1", "r2")
Op = tuple[str, str, int]


def ops_strategy(block_size: int, window: int) -> st.SearchStrategy[list[Op]]:
    """Random (kind, request id, offset) calls; the offset is from the request's covered length.

    "allocate" covers max(0, covered + offset) tokens (offset <= 0 is a no-op re-cover); "release"
    reports max(0, covered + offset) computed tokens, so releases land behind, at and ahead of the
    frontier; "free" ignores the offset. Allocate and release are drawn twice as often as free.
    """
    kinds = st.sampled_from(("allocate", "allocate", "release", "release", "free"))
    offsets = st.integers(-window - 2 * block_size, window + 4 * block_size)
    return st.lists(st.tuples(kinds, st.sampled_from(REQUEST_IDS), offsets), min_size=5, max_size=60)


def check_invariants(
    manager: KVCacheManager,
    window: int,
    totals: dict[str, int],
    covered: dict[str, int],
    computed: dict[str, int],
) -> None:
    """Pool accounting, no shared blocks, and tables that match a simple reference model."""
    bs = manager.block_size
    assert set(manager.request_ids) == set(covered)
    for group in manager.group_names:
        tables = [manager.block_table(r, group) for r in manager.request_ids]
        live = [b for table in tables for b in table if b != NULL_BLOCK]
        assert len(live) == len(set(live)), f"a block of {group!r} is in two table entries"
        used, free = manager.num_used_blocks(group), manager.num_free_blocks(group)
        assert used == len(live)
        assert used + free == totals[group]
    for request_id, num_tokens in covered.items():
        full = manager.block_table(request_id, "full")
        sliding = manager.block_table(request_id, "sliding")
        assert NULL_BLOCK not in full
        assert len(full) == len(sliding) == num_blocks_for(num_tokens, bs)
        num_dead = min(len(sliding), first_live_block(computed[request_id], window, bs))
        assert sliding[:num_dead] == [NULL_BLOCK] * num_dead
        assert NULL_BLOCK not in sliding[num_dead:]


@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    num_full=st.integers(1, 30),
    num_sliding=st.integers(1, 12),
    data=st.data(),
)
def test_random_operations_keep_invariants(
    block_size: int, num_full: int, num_sliding: int, data: st.DataObject
) -> None:
    # windows of a few blocks, multiples or not, so that requests outgrow them within a few ops
    window = data.draw(st.integers(1, 3 * block_size + 3), label="window")
    ops = data.draw(ops_strategy(block_size, window), label="ops")
    manager = make_manager(block_size, window, num_full, num_sliding)
    totals = {"full": num_full, "sliding": num_sliding}
    covered: dict[str, int] = {}
    computed: dict[str, int] = {}
    for kind, request_id, offset in ops:
        value = max(0, covered.get(request_id, 0) + offset)
        if kind == "allocate":
            expected_ok = manager.can_allocate(request_id, value)
            try:
                manager.allocate(request_id, value)
            except NoFreeBlocks:
                assert not expected_ok
            else:
                assert expected_ok
                covered[request_id] = max(covered.get(request_id, 0), value)
                computed.setdefault(request_id, 0)
        elif kind == "release":
            manager.release_out_of_window(request_id, value)
            if request_id in computed:
                computed[request_id] = max(computed[request_id], value)
        else:
            manager.free(request_id)
            covered.pop(request_id, None)
            computed.pop(request_id, None)
        check_invariants(manager, window, totals, covered, computed)
    for request_id in REQUEST_IDS:
        manager.free(request_id)
    assert all(manager.num_used_blocks(g) == 0 for g in manager.group_names)
    assert manager.usage() == 0.0


# -- prefix caching ----------------------------------------------------------------------------------


def full_only(num_blocks: int, block_size: int = 2) -> KVCacheManager:
    return KVCacheManager([CacheGroupSpec("full", num_blocks, None)], block_size)


def run_and_cache(manager: KVCacheManager, request_id: str, tokens: list[int]) -> None:
    manager.allocate(request_id, len(tokens))
    manager.cache_blocks(request_id, tokens, len(tokens))


def test_block_pool_keeps_freed_blocks_cached_until_evicted_lru() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    assert pool.cache(ids[0], b"h0") and pool.cache(ids[1], b"h1")
    assert not pool.cache(ids[1], b"h2")  # one hash per block
    pool.free(ids)
    assert (pool.num_free, pool.num_cached, pool.lookup(b"h0")) == (4, 2, 0)
    pool.touch([0])  # a hit takes the free cached block back
    assert (pool.ref_count(0), pool.num_free) == (1, 3)
    pool.touch([0])
    pool.free([0])
    assert pool.ref_count(0) == 1
    assert pool.allocate(3) == [2, 3, 1]  # uncached blocks first, then the least recently freed
    assert pool.lookup(b"h1") is None and pool.lookup(b"h0") == 0  # block 1 was evicted
    with pytest.raises(ValueError, match="not cached"):
        pool.touch([2])
    assert pool.reset_cache() == 1 and pool.lookup(b"h0") is None


def test_hit_shares_blocks_with_reference_counts() -> None:
    manager = full_only(16)
    tokens = list(range(10, 19))  # 9 tokens: blocks 0-3 full, block 4 partial
    run_and_cache(manager, "a", tokens)
    assert manager.num_cached_blocks("full") == 4
    hit = manager.find_cached_prefix([*tokens[:8], 99], max_tokens=8)
    assert hit.num_tokens == 8 and hit.block_ids["full"] == tuple(manager.block_table("a", "full")[:4])
    assert manager.can_allocate("b", 9, hit)
    manager.allocate("b", 9, hit)
    table_b = manager.block_table("b", "full")
    assert table_b[:4] == manager.block_table("a", "full")[:4] and table_b[4] not in manager.block_table(
        "a", "full"
    )
    assert [manager.ref_count("full", b) for b in table_b] == [2, 2, 2, 2, 1]
    assert manager.num_used_blocks("full") == 6
    manager.free("a")
    assert [manager.ref_count("full", b) for b in table_b] == [1, 1, 1, 1, 1]
    manager.free("b")
    assert manager.num_used_blocks("full") == 0 and manager.num_cached_blocks("full") == 4
    manager.allocate("c", 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        manager.allocate("c", 9, hit)


def test_hit_is_capped_and_ends_at_the_first_difference() -> None:
    manager = full_only(16)
    tokens = list(range(10, 20))
    run_and_cache(manager, "a", tokens)
    assert manager.find_cached_prefix(tokens, max_tokens=9).num_tokens == 8  # one token always runs
    assert manager.find_cached_prefix(tokens, max_tokens=10).num_tokens == 10
    changed = [*tokens[:5], 0, *tokens[6:]]  # block 2 differs, so blocks 3 and 4 (chained) miss too
    assert manager.find_cached_prefix(changed, max_tokens=10).num_tokens == 4
    assert manager.find_cached_prefix(tokens, max_tokens=10, extra_key="adapter-1").num_tokens == 0
    assert manager.find_cached_prefix([], max_tokens=0).num_tokens == 0


def test_only_computed_full_blocks_are_registered() -> None:
    manager = full_only(16)
    tokens = list(range(10, 20))
    manager.allocate("a", 10)
    assert manager.cache_blocks("a", tokens, 5) == 2  # [0, 4) computed; block 2 is half written
    assert manager.find_cached_prefix(tokens, max_tokens=10).num_tokens == 4
    assert manager.cache_blocks("a", tokens, 10) == 3
    assert manager.cache_blocks("a", tokens, 10) == 0  # offered once
    assert manager.cache_blocks("nobody", tokens, 10) == 0


def test_duplicate_blocks_keep_the_first_copy() -> None:
    manager = full_only(16)
    tokens = list(range(10, 14))
    manager.allocate("a", 4)
    manager.allocate("b", 4)  # computed concurrently: same content, other blocks
    assert manager.cache_blocks("a", tokens, 4) == 2
    assert manager.cache_blocks("b", tokens, 4) == 0
    hit = manager.find_cached_prefix(tokens, max_tokens=4)
    assert hit.block_ids["full"] == tuple(manager.block_table("a", "full"))


def test_eviction_takes_the_least_recently_freed_tail_first() -> None:
    manager = full_only(8)
    a_tokens = list(range(10, 18))
    run_and_cache(manager, "a", a_tokens)  # blocks 0-3
    manager.free("a")  # freed tail first: block 3 is evicted before block 0
    run_and_cache(manager, "b", list(range(50, 58)))  # takes the 4 never-used blocks
    assert manager.find_cached_prefix(a_tokens, max_tokens=8).num_tokens == 8
    manager.allocate("c", 2)  # one more block: evicts a's last block
    assert manager.find_cached_prefix(a_tokens, max_tokens=8).num_tokens == 6
    manager.allocate("c", 8)  # three more: evicts blocks 2, 1, then 0
    assert manager.find_cached_prefix(a_tokens, max_tokens=8).num_tokens == 0
    assert manager.num_cached_blocks("full") == 4  # b's blocks, still in use


def test_a_hit_counts_its_free_cached_blocks_against_the_pool() -> None:
    manager = full_only(4)
    tokens = list(range(10, 16))
    run_and_cache(manager, "a", tokens)  # 3 blocks
    manager.free("a")
    hit = manager.find_cached_prefix([*tokens, 1, 2], max_tokens=6)
    assert hit.num_tokens == 6
    assert manager.can_allocate("b", 8, hit)  # 3 cached + 1 new of 4
    assert not manager.can_allocate("b", 10, hit)  # 3 cached + 2 new: the new ones would evict the hit
    with pytest.raises(NoFreeBlocks):
        manager.allocate("b", 10, hit)
    assert manager.num_used_blocks("full") == 0 and manager.num_cached_blocks("full") == 3


@pytest.mark.parametrize(
    ("evicted", "expected_blocks"),
    [
        # block_size 4, window 6: a hit of n blocks needs blocks [(4n - 5) // 4, n) in the sliding group
        ((), 6),
        ((0, 1, 2, 3), 6),  # the window at 24 reaches back to position 19: blocks 4 and 5 suffice
        ((2,), 6),
        ((5,), 5),  # 6 needs blocks 4-5; 5 needs 3-4
        ((4,), 4),  # 6 and 5 need block 4; 4 needs 2-3
        ((3, 4), 3),  # 3 needs 1-2
        ((2, 4), 2),  # 4 and 3 need block 2; 2 needs 0-1
        ((0, 2, 4), 0),  # 4 and 3 need block 2; 2 and 1 need block 0
    ],
)
def test_sliding_hit_needs_only_the_blocks_inside_the_window(
    evicted: tuple[int, ...], expected_blocks: int
) -> None:
    manager = make_manager(block_size=4, window=6, num_full=64, num_sliding=64)
    tokens = list(range(10, 35))  # 25 tokens: 6 full blocks
    run_and_cache(manager, "a", tokens)
    sliding = manager.block_table("a", "sliding")
    manager.free("a")
    for block in evicted:  # drop the hash of the sliding copy only
        pool = manager._pools["sliding"]  # the test reaches in: eviction of chosen blocks
        pool._uncache(sliding[block])
    hit = manager.find_cached_prefix(tokens, max_tokens=24)
    assert hit.num_tokens == 4 * expected_blocks
    first_live = first_live_block(hit.num_tokens, 6, 4)
    assert hit.block_ids["sliding"][:first_live] == (NULL_BLOCK,) * first_live
    assert NULL_BLOCK not in hit.block_ids["sliding"][first_live:]
    assert NULL_BLOCK not in hit.block_ids["full"]
    manager.allocate("b", 25, hit)
    assert manager.block_table("b", "sliding")[:first_live] == [NULL_BLOCK] * first_live
    assert manager.num_used_blocks("sliding") == len(manager.block_table("b", "sliding")) - first_live
    manager.free("b")
    assert manager.num_used_blocks("sliding") == manager.num_used_blocks("full") == 0


def test_released_sliding_blocks_stay_cached() -> None:
    manager = make_manager(block_size=4, window=6)
    tokens = list(range(10, 35))
    manager.allocate("a", 25)
    manager.cache_blocks("a", tokens, 25)
    assert manager.release_out_of_window("a", 25) == 5  # reads from 20: blocks 0-4 are dead
    assert manager.num_cached_blocks("sliding") == 6
    assert manager.find_cached_prefix(tokens, max_tokens=24).num_tokens == 24


def test_reset_prefix_cache_forgets_every_block() -> None:
    manager = full_only(8)
    tokens = list(range(10, 18))
    run_and_cache(manager, "a", tokens)
    assert manager.reset_prefix_cache() == 4
    assert manager.find_cached_prefix(tokens, max_tokens=8).num_tokens == 0
    assert manager.block_table("a", "full") == [0, 1, 2, 3]  # a keeps its blocks
    manager.free("a")
    assert manager.num_used_blocks("full") == 0
