"""EngineConfig: the engine's one set of limits, its checks, and the one sizing of the token budget."""

from __future__ import annotations

import pytest

from engine.engine_config import DEFAULT_PREFILL_CHUNK, EngineConfig, batched_tokens_for
from engine.kv_cache import CacheGroupSpec, KVCacheManager
from engine.scheduler import Scheduler


def test_the_budget_is_every_canvas_plus_a_prefill_chunk() -> None:
    assert batched_tokens_for(16, 256) == 16 * 256 + DEFAULT_PREFILL_CHUNK == 6144
    assert batched_tokens_for(4, 82, prefill_chunk=100) == 428


def test_resolve_fills_what_depends_on_the_model_and_keeps_what_was_set() -> None:
    resolved = EngineConfig(max_num_seqs=4).resolve(canvas_length=82, max_position_embeddings=512)
    assert resolved.max_num_batched_tokens == batched_tokens_for(4, 82)
    assert resolved.max_model_len == resolved.resolved_max_model_len == 512
    given = EngineConfig(max_num_batched_tokens=300, max_model_len=128).resolve(82, 512)
    assert (given.max_num_batched_tokens, given.max_model_len) == (300, 128)
    assert given.resolve(82, 512) == given


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs=0 must be >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens=0 must be >= 1"),
        ({"max_waiting": -1}, "max_waiting=-1 must be >= 0"),
        ({"max_model_len": 0}, "max_model_len=0 must be >= 1"),
        ({"block_size": 0}, "block_size=0 must be >= 1"),
        ({"num_full_blocks": 0}, "num_full_blocks=0 must be >= 1"),
        ({"kv_cache_bytes": -1}, "kv_cache_bytes=-1 must be >= 0"),
    ],
)
def test_out_of_range_limits_say_which(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_a_budget_below_one_canvas_is_refused_when_the_model_is_known() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens=40 cannot hold one canvas of 82 tokens"):
        EngineConfig(max_num_batched_tokens=40).resolve(82, 512)


def test_the_scheduler_reads_the_engine_config() -> None:
    kv = KVCacheManager([CacheGroupSpec("full", 64, None)], 4)
    with pytest.raises(ValueError, match="max_model_len is unset"):
        Scheduler(EngineConfig(), 8, kv)
    with pytest.raises(ValueError, match="cannot hold one canvas"):
        Scheduler(EngineConfig(max_model_len=64, max_num_batched_tokens=4), 8, kv)
    scheduler = Scheduler(EngineConfig(max_model_len=64, max_num_seqs=2), 8, kv)
    assert scheduler.config.max_num_batched_tokens == batched_tokens_for(2, 8)
    assert scheduler.canvas_length == 8
