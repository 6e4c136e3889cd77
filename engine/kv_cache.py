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

Invariants, per group: a physical block appears in at most one request's table, at most once;
used + free == num_blocks; a full-group table never holds `NULL_BLOCK`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

NULL_BLOCK = -1
"""Table entry of a sliding-group block that was released because it lies outside the window."""


class NoFreeBlocks(RuntimeError):
    """A cache group has fewer free blocks than an allocation needs; nothing was changed."""


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


class BlockPool:
    """The physical block ids [0, num_blocks) of one cache group, each either free or in use.

    Invariant: num_free + num_used == num_blocks, and an id handed out by `allocate` is not handed out
    again until it is given back by `free`. Ids come out lowest first, then in the order they were freed.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_ids: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free ids; raise `NoFreeBlocks` (taking none) if fewer are free."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_free:
            raise NoFreeBlocks(f"need {num_blocks} blocks, {self.num_free} of {self.num_blocks} are free")
        block_ids = [self._free_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._is_free[block_id] = False
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Give ids back; raise ValueError (freeing none) on an unknown, repeated or already-free id."""
        to_free = list(block_ids)
        if len(set(to_free)) != len(to_free):
            raise ValueError(f"block ids {to_free} repeat: each block is freed once")
        for block_id in to_free:
            if not 0 <= block_id < self.num_blocks or self._is_free[block_id]:
                raise ValueError(f"block {block_id} is not an in-use block of this pool")
        for block_id in to_free:
            self._is_free[block_id] = True
            self._free_ids.append(block_id)


@dataclass
class _GroupTable:
    """One request's block table in one group.

    `block_ids[i]` is the physical block of logical block i, or NULL_BLOCK for i < num_released;
    len(block_ids) blocks are covered. `num_released` may run ahead of len(block_ids) when the window
    has passed blocks that were never allocated; those are appended as NULL_BLOCK when covered.
    """

    block_ids: list[int] = field(default_factory=list)
    num_released: int = 0

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


class KVCacheManager:
    """Block tables of all requests over one pool per cache group.

    Invariants, per group: a physical block belongs to at most one request's table; used + free ==
    num_blocks; a full-group table holds no NULL_BLOCK; a sliding-group table holds NULL_BLOCK exactly
    at the logical blocks released by `release_out_of_window`, which are never re-allocated.
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

    @property
    def request_ids(self) -> tuple[str, ...]:
        """Requests holding a table, in the order they were first allocated."""
        return tuple(self._tables)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        """True iff `allocate(request_id, num_tokens)` would succeed in every group."""
        return not self._shortfalls(request_id, num_tokens)

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Make the request's tables cover positions [0, num_tokens), allocating only the new blocks.

        Already-covered entries keep their ids; released sliding blocks stay NULL_BLOCK. A smaller
        `num_tokens` than already covered changes nothing. All-or-nothing: if any group lacks blocks,
        raise `NoFreeBlocks` naming the groups and counts, and leave every table and pool unchanged.
        """
        shortfalls = self._shortfalls(request_id, num_tokens)
        if shortfalls:
            raise NoFreeBlocks(
                f"cannot cover {num_tokens} tokens of request {request_id!r}: {'; '.join(shortfalls)}; "
                "free or preempt a request, or give the cache more blocks"
            )
        tables = self._tables.setdefault(request_id, {name: _GroupTable() for name in self.group_names})
        num_blocks = num_blocks_for(num_tokens, self.block_size)
        for name, table in tables.items():
            table.grow(num_blocks, self._pools[name].allocate(table.num_to_allocate(num_blocks)))

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
        """Return every block of the request to its pool and forget it; unknown ids are a no-op."""
        for name, table in self._tables.pop(request_id, {}).items():
            self._pools[name].free(table.live_ids())

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
        return self._pool(group).num_free

    def num_used_blocks(self, group: str) -> int:
        return self._pool(group).num_used

    def usage(self) -> float:
        """Fraction of blocks in use in the fullest group, in [0, 1]."""
        return max(self.usage_by_group().values())

    def usage_by_group(self) -> dict[str, float]:
        """Fraction of blocks in use, per group, in [0, 1]."""
        return {name: pool.num_used / pool.num_blocks for name, pool in self._pools.items()}

    def _pool(self, group: str) -> BlockPool:
        if group not in self._pools:
            raise KeyError(f"unknown cache group {group!r}; the groups are {list(self.group_names)}")
        return self._pools[group]

    def _shortfalls(self, request_id: str, num_tokens: int) -> list[str]:
        """One message per group whose pool cannot supply the blocks this allocation needs."""
        num_blocks = num_blocks_for(num_tokens, self.block_size)
        tables = self._tables.get(request_id, {})
        shortfalls = []
        for name, pool in self._pools.items():
            needed = tables.get(name, _GroupTable()).num_to_allocate(num_blocks)
            if needed > pool.num_free:
                shortfalls.append(
                    f"group {name!r} needs {needed} blocks but {pool.num_free} of {pool.num_blocks} are free"
                )
        return shortfalls
