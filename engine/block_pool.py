"""The physical blocks of one cache group: reference counts, a free list in LRU order, a hash index.

Every block id in [0, num_blocks) is either *in use* (reference count >= 1: that many table entries
of running requests hold it) or *free* (count 0). A free block may still be *cached*: when its K/V
were registered under a content hash (`cache`), the hash stays findable (`lookup`) after the block
is freed, and a later request can take it back (`touch`) without recomputing it. A cached block
loses its hash only when `allocate` hands it out again (eviction) or `reset_cache` drops every hash.

Free blocks are handed out least recently freed first, so cached blocks are evicted in LRU order
and only when no uncached free block is older. Ids come out lowest first at the start.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from engine.prefix_cache import BlockHash


class NoFreeBlocks(RuntimeError):
    """A cache group has fewer free blocks than an allocation needs; nothing was changed."""


class BlockPool:
    """Reference-counted block ids of one cache group.

    Invariants: num_free + num_used == num_blocks; a block is in the free list iff its count is 0;
    a hash names at most one block and a block carries at most one hash.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """Blocks with count 0, least recently freed first: the eviction order."""
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks with reference count 0, cached ones included."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks carrying a hash, in use or free."""
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free ids (count 1 each), evicting the hashes they carried; raise
        `NoFreeBlocks` (taking none) if fewer are free."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_free:
            raise NoFreeBlocks(f"need {num_blocks} blocks, {self.num_free} of {self.num_blocks} are free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self._refs[block_id] = 1
            self._uncache(block_id)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each id; a block reaching 0 joins the end of the free list, keeping
        its hash. Raise ValueError (changing nothing) on an unknown, repeated or free id."""
        to_free = list(block_ids)
        if len(set(to_free)) != len(to_free):
            raise ValueError(f"block ids {to_free} repeat: each block is freed once")
        for block_id in to_free:
            if not 0 <= block_id < self.num_blocks or self._refs[block_id] == 0:
                raise ValueError(f"block {block_id} is not an in-use block of this pool")
        for block_id in to_free:
            self._refs[block_id] -= 1
            if self._refs[block_id] == 0:
                self._free[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block registered under `block_hash`, in use or free; None if there is none."""
        return self._block_of.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each cached block (a cache hit); a free one leaves the free list."""
        for block_id in block_ids:
            if block_id not in self._hash_of:
                raise ValueError(f"block {block_id} is not cached: only cached blocks are shared")
            if self._refs[block_id] == 0:
                del self._free[block_id]
            self._refs[block_id] += 1

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register an in-use block's K/V under `block_hash`. Returns False (changing nothing) when the
        hash already names a block (two requests computed the same block: the first one stays) or
        the block already carries a hash."""
        if self._refs[block_id] == 0:
            raise ValueError(f"block {block_id} is free: only a block holding computed K/V is cached")
        if block_hash in self._block_of or block_id in self._hash_of:
            return False
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def reset_cache(self) -> int:
        """Forget every hash (blocks in use stay with their requests); returns how many were dropped."""
        num_dropped = len(self._block_of)
        self._block_of.clear()
        self._hash_of.clear()
        return num_dropped

    def _uncache(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id, None)
        if block_hash is not None:
            del self._block_of[block_hash]
