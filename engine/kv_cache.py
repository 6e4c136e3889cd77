"""Paged KV-cache bookkeeping: block pools and per-request block tables (no torch).

A request's token positions are [0, num_tokens). The cache stores them in fixed-size blocks of
`block_size` positions; a request's block table maps logical block i (positions [i*bs, (i+1)*bs)) to a
physical block id, which the runner turns into slot indices.

DiffusionGemma has two kinds of layers whose K/V tensors have different shapes, so a physical block of
one kind cannot hold the other: each kind is a *cache group* with its own `BlockPool`, and every request
keeps one table per group. Allocation is all-or-nothing across groups, so a request is either fully
backed in every group or not changed at all.

- A full group (`window=None`) keeps every position: its table grows with the sequence and its blocks
  are returned only by `free`.
- A sliding group (`window=W`) serves layers where a query at position p reads only kv positions
  > p - W (a canvas at [L, L+256) reads the cache at [L-W+1, L)). Once a request has `num_computed`
  tokens in its cache, every future query sits at a position >= num_computed and never reads below
  num_computed - W + 1, so blocks lying entirely below that are released back to the pool and their
  table entries become `NULL_BLOCK`. A request advancing by chunks of `chunk` tokens therefore holds at
  most about ceil((W - 1 + chunk) / block_size) + 1 live sliding blocks (the live span
  [num_computed - W + 1, num_computed + chunk) rounded out to block edges), however long it grows.

The caller (scheduler or runner) calls `release_out_of_window` after each causal write into the cache,
with the request's new number of computed tokens; the manager never guesses what has been computed.

Prefix caching (`engine.prefix_cache` has the hashing and the hit rule): once positions are computed,
the caller registers the request's full blocks under their content hashes (`cache_blocks`); freed and
released blocks keep their hashes in the pool (`engine.block_pool`) until they are evicted, least
recently freed first. A new request asks `find_cached_prefix` for the longest usable hit and passes it
to `allocate`, which puts the cached blocks at the head of its tables (sharing them, one more reference
each) and allocates only the rest. Shared blocks are full and computed, so nobody writes them again.

Invariants, per group: a block's reference count equals the number of table entries holding it, and
no table holds a block twice; used + free == num_blocks; a full-group table never holds `NULL_BLOCK`;
only full blocks whose positions are computed carry a hash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, NoFreeBlocks
from engine.prefix_cache import (
    BlockHash,
    extend_hashes,
    longest_hit,
    num_cached_from_start,
    window_hit_ok,
)

__all__ = [
    "NULL_BLOCK",
    "BlockPool",
    "CacheGroupSpec",
    "CacheHit",
    "KVCacheManager",
    "NoFreeBlocks",
    "first_live_block",
    "num_blocks_for",
]

NULL_BLOCK = -1
"""Table entry of a sliding-group block that was released because it lies outside the window."""


@dataclass(frozen=True)
class CacheGroupSpec:
    """One cache group: layers sharing a K/V shape, served by one pool of physical blocks."""

    name: str
    """Unique name of the group, e.g. "full" or "sliding"."""
    num_blocks: int
    """Physical blocks in this group's pool (>= 1)."""
    window: int | None = None
    """None keeps every position; W lets positions < num_computed - W + 1 be released."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("cache group name is empty: give each group a unique name")
        if self.num_blocks < 1:
            raise ValueError(
                f"cache group {self.name!r} has num_blocks={self.num_blocks}: it needs at least 1"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"cache group {self.name!r} has window={self.window}: use None or a value >= 1")


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to cover positions [0, num_tokens): ceil(num_tokens / block_size).

    With block_size 16: 0 tokens -> 0 blocks, 16 -> 1, 17 -> 2.
    """
    if num_tokens < 0 or block_size < 1:
        raise ValueError(f"need num_tokens >= 0 and block_size >= 1, got {num_tokens} and {block_size}")
    return -(-num_tokens // block_size)


def first_live_block(num_computed_tokens: int, window: int, block_size: int) -> int:
    """Index of the first logical block a future query may still read; every block before it is dead.

    Nothing below position num_computed_tokens - window + 1 is read again. Block i covers
    [i*bs, (i+1)*bs) and is dead iff (i+1)*bs <= num_computed_tokens - window + 1, so the first live
    block is max(0, num_computed_tokens - window + 1) // bs.

    Worked example (window 1024, block_size 16, 2000 computed tokens): the oldest readable position is
    2000 - 1024 + 1 = 977 and 977 // 16 = 61, so blocks 0..60 (positions [0, 976)) are dead while block
    61 ([976, 992)) lives, because position 977 lies in it.
    """
    return max(0, num_computed_tokens - window + 1) // block_size


@dataclass
class _GroupTable:
    """One request's block table in one group.

    `block_ids[i]` is the physical block of logical block i, or NULL_BLOCK for i < num_released;
    len(block_ids) blocks are covered. `num_released` may run ahead of len(block_ids) when the window
    has passed blocks that were never allocated; those are appended as NULL_BLOCK when covered.
    """

    block_ids: list[int] = field(default_factory=list)
    num_released: int = 0
    num_hashed: int = 0
    """Leading logical blocks already offered to the pool's hash index (`cache_blocks`)."""

    def num_to_allocate(self, num_blocks: int) -> int:
        """Physical blocks needed to cover `num_blocks` logical blocks (released ones need none)."""
        return max(0, num_blocks - max(len(self.block_ids), self.num_released))

    def grow(self, num_blocks: int, new_ids: list[int]) -> None:
        """Cover `num_blocks` logical blocks: NULL_BLOCK below num_released, then `new_ids`."""
        num_nulls = max(0, min(num_blocks, self.num_released) - len(self.block_ids))
        self.block_ids.extend([NULL_BLOCK] * num_nulls)
        self.block_ids.extend(new_ids)

    def release(self, first_live: int) -> list[int]:
        """Null out logical blocks below `first_live` and return the physical ids they held."""
        start, end = self.num_released, min(first_live, len(self.block_ids))
        freed = self.block_ids[start:end]
        for i in range(start, end):
            self.block_ids[i] = NULL_BLOCK
        self.num_released = max(self.num_released, first_live)
        return freed

    def live_ids(self) -> list[int]:
        return [block_id for block_id in self.block_ids if block_id != NULL_BLOCK]


@dataclass(frozen=True)
class CacheHit:
    """The cached head of a request's tables, found by `KVCacheManager.find_cached_prefix`.

    `block_ids[group]` covers the first num_tokens // block_size logical blocks: cached block ids,
    and NULL_BLOCK for the blocks of a sliding group that lie below its window at num_tokens.
    `hashes` name the request's full blocks as far as the lookup hashed them (for reuse).
    Valid only until the pools change: pass it to `allocate` in the same scheduling pass.
    """

    num_tokens: int
    block_ids: dict[str, tuple[int, ...]]
    hashes: tuple[BlockHash, ...] = ()

    @classmethod
    def none(cls, group_names: Sequence[str]) -> CacheHit:
        """No hit: nothing cached is used."""
        return cls(0, {name: () for name in group_names})


class KVCacheManager:
    """Block tables of all requests over one reference-counted pool per cache group.

    Invariants, per group: a block's reference count equals the number of table entries holding it;
    used + free == num_blocks; a full-group table holds no NULL_BLOCK; a sliding-group table holds
    NULL_BLOCK exactly at the logical blocks below its window (released by `release_out_of_window` or
    skipped by a cache hit), which are never re-allocated.
    """

    def __init__(self, groups: Sequence[CacheGroupSpec], block_size: int) -> None:
        names = [group.name for group in groups]
        if not names:
            raise ValueError("KVCacheManager needs at least one cache group")
        if len(set(names)) != len(names):
            raise ValueError(f"cache group names {names} repeat: give each group a unique name")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: it must be >= 1")
        self.block_size = block_size
        self.group_names = tuple(names)
        self._specs = {group.name: group for group in groups}
        self._pools = {group.name: BlockPool(group.num_blocks) for group in groups}
        self._tables: dict[str, dict[str, _GroupTable]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        """Per request: the hashes of its full blocks computed so far (the chain grows, never changes)."""

    @property
    def request_ids(self) -> tuple[str, ...]:
        """Requests holding a table, in the order they were first allocated."""
        return tuple(self._tables)

    def can_allocate(self, request_id: str, num_tokens: int, hit: CacheHit | None = None) -> bool:
        """True iff `allocate(request_id, num_tokens, hit)` would succeed in every group."""
        return not self._shortfalls(request_id, num_tokens, hit)

    def allocate(self, request_id: str, num_tokens: int, hit: CacheHit | None = None) -> None:
        """Make the request's tables cover positions [0, num_tokens), allocating only the new blocks.

        Already-covered entries keep their ids; released sliding blocks stay NULL_BLOCK. A smaller
        `num_tokens` than already covered changes nothing. A `hit` (only for a request without tables)
        becomes the head of its tables, each cached block shared with one more reference. All-or-nothing:
        if any group lacks blocks, raise `NoFreeBlocks` naming the groups and counts, and leave every
        table and pool unchanged.
        """
        if hit is not None and request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds blocks: a cache hit starts a request")
        shortfalls = self._shortfalls(request_id, num_tokens, hit)
        if shortfalls:
            raise NoFreeBlocks(
                f"cannot cover {num_tokens} tokens of request {request_id!r}: {'; '.join(shortfalls)}; "
                "free or preempt a request, or give the cache more blocks"
            )
        if request_id not in self._tables:
            self._tables[request_id] = self._start_tables(hit)
            if hit is not None:
                self._hashes[request_id] = list(hit.hashes)
                for name, block_ids in hit.block_ids.items():
                    self._pools[name].touch(b for b in block_ids if b != NULL_BLOCK)
        num_blocks = num_blocks_for(num_tokens, self.block_size)
        for name, table in self._tables[request_id].items():
            table.grow(num_blocks, self._pools[name].allocate(table.num_to_allocate(num_blocks)))

    def find_cached_prefix(
        self, token_ids: Sequence[int], max_tokens: int, extra_key: str | None = None
    ) -> CacheHit:
        """The longest head of `token_ids`, at most `max_tokens` long and a whole number of blocks, whose
        K/V every group can reuse (the rule is in `engine.prefix_cache`). Changes nothing.

        Example, block_size 4: with blocks 0-2 of a 14-token prompt cached in every group and
        max_tokens 13, the hit is 12 tokens; with max_tokens 11 it is 8.
        """
        hashes: list[BlockHash] = []
        extend_hashes(hashes, token_ids[: max(0, max_tokens)], self.block_size, extra_key)
        found = {name: [pool.lookup(h) for h in hashes] for name, pool in self._pools.items()}
        cached = {name: [b is not None for b in ids] for name, ids in found.items()}
        full = [name for name in self.group_names if self._specs[name].window is None]
        windowed = [name for name in self.group_names if name not in full]
        num_blocks = longest_hit(
            len(hashes),
            [num_cached_from_start(cached[name]) for name in full],
            [self._window_check(cached[name], self._window_of(name)) for name in windowed],
        )
        block_ids = {}
        for name, ids in found.items():
            first = self._first_live(name, num_blocks * self.block_size)
            block_ids[name] = tuple(
                NULL_BLOCK if i < first else _cached_id(ids[i]) for i in range(num_blocks)
            )
        return CacheHit(num_blocks * self.block_size, block_ids, tuple(hashes))

    def cache_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        extra_key: str | None = None,
    ) -> int:
        """Register the request's full blocks within [0, num_computed_tokens) under their content hashes.

        `token_ids` are the tokens the request's cache holds (at least num_computed_tokens of them) and
        those positions must have been written. Blocks offered before are skipped; a block whose hash
        already names another block stays unnamed. Call it before `release_out_of_window`, so that
        released sliding blocks stay cached. Returns how many blocks were registered.
        """
        tables = self._tables.get(request_id)
        if tables is None:
            return 0
        hashes = self._hashes.setdefault(request_id, [])
        extend_hashes(hashes, token_ids[:num_computed_tokens], self.block_size, extra_key)
        num_cached = 0
        num_full = num_computed_tokens // self.block_size  # `hashes` may name blocks still to compute
        for name, table in tables.items():
            end = min(num_full, len(table.block_ids))
            for i in range(table.num_hashed, end):
                block_id = table.block_ids[i]
                if block_id != NULL_BLOCK:
                    num_cached += self._pools[name].cache(block_id, hashes[i])
            table.num_hashed = max(table.num_hashed, end)
        return num_cached

    def release_out_of_window(self, request_id: str, num_computed_tokens: int) -> int:
        """In every windowed group, free the request's blocks lying entirely below the window.

        A block is freed when all its positions are < num_computed_tokens - W + 1 (see
        `first_live_block`). Example, block_size 4 and W 6 with 13 computed tokens: the oldest
        readable position is 13 - 6 + 1 = 8, so blocks 0 ([0, 4)) and 1 ([4, 8)) are freed and block 2
        ([8, 12)) stays. Full groups are untouched. Returns the number of blocks freed (0 for an
        unknown request or when the window has not moved past another block).
        """
        if num_computed_tokens < 0:
            raise ValueError(f"num_computed_tokens={num_computed_tokens}: it must be >= 0")
        num_freed = 0
        for name, table in self._tables.get(request_id, {}).items():
            window = self._specs[name].window
            if window is None:
                continue
            freed = table.release(first_live_block(num_computed_tokens, window, self.block_size))
            self._pools[name].free(freed)
            num_freed += len(freed)
        return num_freed

    def free(self, request_id: str) -> None:
        """Drop the request's references to its blocks and forget it; unknown ids are a no-op.

        Blocks are freed tail first, so a request's later blocks are evicted before its prefix.
        """
        self._hashes.pop(request_id, None)
        for name, table in self._tables.pop(request_id, {}).items():
            self._pools[name].free(reversed(table.live_ids()))

    def reset_prefix_cache(self) -> int:
        """Forget every content hash, so nothing cached is found again; returns how many were dropped.
        Blocks in use stay with their requests (their K/V are still right for them)."""
        return sum(pool.reset_cache() for pool in self._pools.values())

    def max_blocks_held(self, group: str, num_tokens: int, max_chunk: int) -> int:
        """Most blocks of `group` one request holds at once while its cache grows to `num_tokens`
        positions by causal chunks of at most `max_chunk`, with `release_out_of_window` after each.

        A full group holds all num_blocks_for(num_tokens) blocks. A sliding group of window W holds at
        most the live span [n - W + 1, n + chunk) rounded out to block edges, so
        min(num_blocks_for(num_tokens), ceil((W - 1 + max_chunk) / block_size) + 1). Example,
        block_size 4, W 8, chunks of 16: at most ceil(23 / 4) + 1 = 7 blocks, however long it grows.
        """
        self._pool(group)  # an unknown group raises KeyError
        num_blocks = num_blocks_for(num_tokens, self.block_size)
        window = self._specs[group].window
        if window is None:
            return num_blocks
        return min(num_blocks, num_blocks_for(window - 1 + max_chunk, self.block_size) + 1)

    def block_table(self, request_id: str, group: str) -> list[int]:
        """A copy of the request's table in `group` ([] for an unknown request)."""
        self._pool(group)
        tables = self._tables.get(request_id)
        return list(tables[group].block_ids) if tables else []

    def num_free_blocks(self, group: str) -> int:
        """Blocks no request holds (cached ones included: they are evicted when needed)."""
        return self._pool(group).num_free

    def num_used_blocks(self, group: str) -> int:
        return self._pool(group).num_used

    def num_cached_blocks(self, group: str) -> int:
        """Blocks carrying a content hash, in use or free."""
        return self._pool(group).num_cached

    def ref_count(self, group: str, block_id: int) -> int:
        """Table entries holding the block."""
        return self._pool(group).ref_count(block_id)

    def usage(self) -> float:
        """Fraction of blocks in use in the fullest group, in [0, 1]."""
        return max(self.usage_by_group().values())

    def usage_by_group(self) -> dict[str, float]:
        """Fraction of blocks in use, per group, in [0, 1] (cached free blocks count as free)."""
        return {name: pool.num_used / pool.num_blocks for name, pool in self._pools.items()}

    def _pool(self, group: str) -> BlockPool:
        if group not in self._pools:
            raise KeyError(f"unknown cache group {group!r}; the groups are {list(self.group_names)}")
        return self._pools[group]

    def _window_of(self, group: str) -> int:
        window = self._specs[group].window
        assert window is not None
        return window

    def _first_live(self, group: str, num_tokens: int) -> int:
        window = self._specs[group].window
        return 0 if window is None else first_live_block(num_tokens, window, self.block_size)

    def _window_check(self, cached: list[bool], window: int) -> Callable[[int], bool]:
        def accepts(num_blocks: int) -> bool:
            first = first_live_block(num_blocks * self.block_size, window, self.block_size)
            return window_hit_ok(cached, num_blocks, first)

        return accepts

    def _start_tables(self, hit: CacheHit | None) -> dict[str, _GroupTable]:
        if hit is None:
            return {name: _GroupTable() for name in self.group_names}
        num_blocks = hit.num_tokens // self.block_size
        return {
            name: _GroupTable(list(hit.block_ids[name]), self._first_live(name, hit.num_tokens), num_blocks)
            for name in self.group_names
        }

    def _shortfalls(self, request_id: str, num_tokens: int, hit: CacheHit | None) -> list[str]:
        """One message per group whose pool cannot supply the blocks this allocation needs (new blocks,
        plus the hit's cached blocks that are free now and would leave the free list)."""
        num_blocks = num_blocks_for(num_tokens, self.block_size)
        tables = self._tables.get(request_id) or self._start_tables(hit)
        shortfalls = []
        for name, pool in self._pools.items():
            needed = tables[name].num_to_allocate(num_blocks)
            if hit is not None and request_id not in self._tables:
                needed += sum(b != NULL_BLOCK and pool.ref_count(b) == 0 for b in hit.block_ids[name])
            if needed > pool.num_free:
                shortfalls.append(
                    f"group {name!r} needs {needed} blocks but {pool.num_free} of {pool.num_blocks} are free"
                )
        return shortfalls


def _cached_id(block_id: int | None) -> int:
    assert block_id is not None, "a hit covers only cached blocks"
    return block_id
