"""Prefix-affinity routing (`engine.prefix_affinity`): the router remembers which cores were sent which
prompt blocks, keyed by adapter, within a bounded memory, and trades a cached prefix against balance."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import pytest

from engine.data_parallel import DataParallelClient
from engine.engine_config import EngineConfig
from engine.prefix_affinity import AFFINITY_SLACK, PrefixAffinity, affinity_for, pick_with_affinity

PROMPT = list(range(100, 110))  # 10 tokens: 2 full blocks of 4


def test_a_prompt_is_named_by_its_full_blocks_and_its_adapter() -> None:
    affinity = PrefixAffinity(block_size=4)
    base = affinity.hashes(PROMPT, None)
    assert len(base) == 2
    assert affinity.hashes(PROMPT[:8], None) == base, "the partial third block is not named"
    assert affinity.hashes(PROMPT, "sql")[0] != base[0], "an adapter's K/V differ from the base's"
    assert affinity.hashes([*PROMPT[:4], 0, *PROMPT[5:]], None)[1] != base[1]


def test_each_core_matches_the_leading_blocks_it_was_sent() -> None:
    affinity = PrefixAffinity(block_size=4)
    affinity.record(affinity.hashes(PROMPT, None), core=0)
    longer = affinity.hashes([*PROMPT, 1, 2, 3, 4, 5, 6], None)  # 4 blocks, the first 2 as PROMPT's
    assert affinity.matched_blocks(longer, 2) == [2, 0]
    other = [*PROMPT[:4], 7, 7, 7, 7]  # shares only the first block
    affinity.record(affinity.hashes(other, None), core=1)
    assert affinity.matched_blocks(longer, 2) == [2, 1]
    assert affinity.matched_blocks(affinity.hashes(PROMPT, "sql"), 2) == [0, 0]


def test_memory_is_bounded_and_forgets_the_least_recently_routed() -> None:
    affinity = PrefixAffinity(block_size=4, capacity=3)
    first = affinity.hashes(PROMPT, None)
    affinity.record(first, core=0)
    second = affinity.hashes(list(range(200, 208)), None)
    affinity.record(second, core=1)
    assert len(affinity) == 3
    assert affinity.matched_blocks(first, 2) == [0, 0], "its first block was forgotten, so nothing leads"
    assert affinity.matched_blocks(second, 2) == [0, 2]
    affinity.clear()
    assert len(affinity) == 0


def test_the_longest_match_wins_unless_that_core_is_too_busy() -> None:
    order = [0, 1]
    assert pick_with_affinity([AFFINITY_SLACK, 0], [2, 0], order) == 0
    assert pick_with_affinity([AFFINITY_SLACK + 1, 0], [2, 0], order) == 1
    assert pick_with_affinity([1, 0], [0, 0], order) == 1, "no match anywhere: the least busy"
    assert pick_with_affinity([0, 0], [0, 0], [1, 0]) == 1, "ties: the round-robin turn"
    assert pick_with_affinity([0, 1], [3, 3], order) == 0, "equal matches: the less busy"


def test_affinity_follows_the_prefix_cache_setting() -> None:
    assert affinity_for(EngineConfig(enable_prefix_caching=False)) is None
    affinity = affinity_for(EngineConfig(block_size=32))
    assert affinity is not None and affinity.block_size == 32


@dataclass(eq=False)
class FakeCore:
    num_in_flight: int = 0
    resets: int = 0

    async def call_utility(self, method: str, *args: Any) -> bool:
        self.resets += method == "reset_prefix_cache"
        return True


def _route(client: DataParallelClient, cores: list[FakeCore], prompt: list[int]) -> int:
    core = cast(FakeCore, client.pick_core(prompt, None))
    core.num_in_flight += 1
    return cores.index(core)


def test_a_conversation_stays_on_its_core_while_the_load_allows() -> None:
    cores = [FakeCore(), FakeCore()]
    client = DataParallelClient(cast(Any, cores), PrefixAffinity(block_size=4))
    turn = list(PROMPT)
    assert _route(client, cores, turn) == 0
    assert _route(client, cores, list(range(300, 310))) == 1, "a new prompt: the least busy"
    for _ in range(AFFINITY_SLACK):
        turn += [5, 6, 7, 8]
        assert _route(client, cores, turn) == 0, "the next turn goes where its prefix is"
    cores[1].num_in_flight = 0  # core 0 now has 1 + AFFINITY_SLACK in flight, core 1 none
    assert _route(client, cores, [*turn, 9, 9, 9, 9]) == 1, "too busy: balance wins"


def test_a_prefix_cache_reset_forgets_the_routes() -> None:
    cores = [FakeCore(), FakeCore()]
    affinity = PrefixAffinity(block_size=4)
    client = DataParallelClient(cast(Any, cores), affinity)
    _route(client, cores, PROMPT)
    assert len(affinity) == 2
    assert asyncio.run(client.call_utility("reset_prefix_cache")) is True
    assert len(affinity) == 0 and [core.resets for core in cores] == [1, 1]


@pytest.mark.parametrize("block_size, capacity", [(0, 8), (4, 0)])
def test_bad_sizes_are_refused(block_size: int, capacity: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PrefixAffinity(block_size, capacity)
