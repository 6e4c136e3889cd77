"""Automatic prefix caching: content addresses of KV blocks and the longest usable cache hit (no torch).

**What a block's K/V depends on.** The K/V a layer writes at position p depends on the token ids and
positions of [0, p] (causal encoder pass) and on the weights (the model, an adapter). Prompt chunks
and committed canvases are written by the same causal encoder pass, so a block of committed canvas
tokens is as reusable as a prompt block. A *full* block i (positions [i*bs, (i+1)*bs)) is therefore
named by `block_hash(parent, tokens, extra_key)`: a SHA-256 over its parent's hash (block i-1's, or
none for block 0), its `block_size` token ids and `extra_key` (anything else that changes K/V: the
adapter id once LoRA exists; None for the base model). Equal hashes mean equal K/V; a partial block
is never named, so it is never shared.

**The rule for a hit.** A request may skip its first h computed positions (h a multiple of
block_size) when every block a future query still reads below h is cached, in every group:

- full-attention group: blocks [0, h/bs) are all cached. Any cached prefix of blocks qualifies, so
  the full group's hit is the longest run of cached blocks from block 0.
- sliding group of window W: a query at position >= h reads positions > h - W only, so only the
  blocks [first_live_block(h, W, bs), h/bs) must be cached; blocks below that are never read again and
  enter the table as NULL_BLOCK (as if released). The blocks in between need not be cached. This is
  the rule of vLLM's `SlidingWindowManager.find_longest_cache_hit` (a hit ends after a run of
  ceil((W - 1) / bs) cached blocks, or after a run that starts at block 0), stated per position:
  the run must cover exactly the blocks the window at h reaches back to.

A sliding group's condition is not monotone in h (a long prompt may have its window's blocks cached
while a shorter prefix's are evicted), so `longest_hit` starts from the full groups' hit and walks h
down until every group accepts it; h = 0 always qualifies. The caller caps h below the number of
tokens it must cache, so at least one token is always computed.

**Limits.** Only blocks whose K/V were written are cached: a prompt, and every canvas committed
before the next one is denoised. The last canvas of a request is written after it ended, by a cache
tail (`engine.cache_tail`), so the next turn of a conversation hits the whole answer. A block that
differs in one token misses, and so does every block after it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

BlockHash = bytes
"""A block's content address: 32 bytes of SHA-256."""


def block_hash(parent: BlockHash | None, token_ids: Sequence[int], extra_key: str | None) -> BlockHash:
    """The content address of one full block: its parent's hash, its token ids and `extra_key`.

    Token ids are hashed as 64-bit integers, so (1, 23) and (12, 3) differ; a None parent and a None
    key are distinct from every real value.
    """
    digest = hashlib.sha256()
    digest.update(b"\x01" + parent if parent is not None else b"\x00")
    digest.update(array("q", token_ids).tobytes())
    digest.update(b"\x00" if extra_key is None else b"\x01" + extra_key.encode())
    return digest.digest()


def extend_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, extra_key: str | None
) -> None:
    """Append the hashes of the full blocks of `token_ids` that `hashes` does not name yet.

    `hashes` must already name the first len(hashes) blocks of `token_ids`; after the call it names all
    len(token_ids) // block_size full blocks. Example with block_size 4 and 10 tokens: 2 hashes.
    """
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else None
        hashes.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size], extra_key))


def num_cached_from_start(cached: Sequence[bool]) -> int:
    """Length of the run of True from index 0 (a full group's hit, in blocks)."""
    for i, hit in enumerate(cached):
        if not hit:
            return i
    return len(cached)


def window_hit_ok(cached: Sequence[bool], num_blocks: int, first_live: int) -> bool:
    """A sliding group accepts a hit of `num_blocks` blocks iff blocks [first_live, num_blocks) are cached."""
    return all(cached[first_live:num_blocks])


def longest_hit(
    num_candidate_blocks: int,
    full_hits: Sequence[int],
    window_checks: Sequence[Callable[[int], bool]],
) -> int:
    """The most blocks, at most `num_candidate_blocks`, that every group accepts.

    `full_hits` are the full groups' runs from block 0; each of `window_checks` says whether a sliding
    group accepts a hit of n blocks. Example: a full group with 5 cached blocks and a sliding group that
    accepts 4 but not 5 give 4.
    """
    num_blocks = min([num_candidate_blocks, *full_hits])
    while num_blocks > 0 and not all(check(num_blocks) for check in window_checks):
        num_blocks -= 1
    return num_blocks
