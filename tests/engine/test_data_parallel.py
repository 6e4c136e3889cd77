"""Several engine core processes behind one client (`engine.data_parallel`): requests spread over the
cores with the outputs one core gives, statistics and views add up, aborts and broadcast utilities
reach the right cores, and one dead core makes the whole client dead."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from engine.client import EngineDead
from engine.core_client import EngineCoreClient
from engine.data_parallel import DataParallelClient, combine_stats
from engine.llm import LLM
from engine.model.loader import load_tokenizer
from engine.prefix_affinity import affinity_for
from engine.request import RequestOutput
from engine.scheduler import StepComposition
from engine.stats import EngineStats, RequestRecord, StepTiming
from tests.engine.checkpoints import save_servable
from tests.engine.core_build import build_engine_at
from tests.engine.test_engine_core import PROMPTS, params


@dataclass
class FakeCore:
    num_in_flight: int


def test_a_request_goes_to_the_least_busy_core_ties_in_turn() -> None:
    cores = [FakeCore(0), FakeCore(0), FakeCore(0)]
    client = DataParallelClient(cast(Any, cores))
    picks = []
    for _ in range(3):
        core = client.pick_core()
        picks.append(cores.index(cast(Any, core)))
        cast(Any, core).num_in_flight += 1
    assert picks == [0, 1, 2]
    cores[1].num_in_flight = 0
    assert client.pick_core() is cores[1]
    cores[1].num_in_flight = 5
    assert client.pick_core() is cores[2], "after the last pick, among the least busy (0 and 2 at 1)"


def _record(reason: str) -> RequestRecord:
    return RequestRecord(reason, 0.0, None, 1.0, 3, 4, 5, [5])


def test_statistics_add_up_and_records_move_to_the_total() -> None:
    one, two = EngineStats(num_running=2, kv_usage=0.5, num_steps=10), EngineStats(num_running=1, num_steps=4)
    one.finished_by_reason = {"stop": 2}
    two.finished_by_reason = {"stop": 1, "length": 3}
    one.last_step = StepComposition(num_denoise_canvases=3)
    two.last_step = StepComposition(num_denoise_canvases=2, num_prefill_tokens=7)
    one.last_timing, two.last_timing = StepTiming(execute_s=0.2), StepTiming(execute_s=0.3)
    one.records.append(_record("stop"))
    two.records.extend([_record("length"), _record("stop")])
    total = EngineStats()
    combine_stats(total, [one, two])
    assert (total.num_running, total.num_steps, total.kv_usage) == (3, 14, 0.25)
    assert total.finished_by_reason == {"stop": 3, "length": 3}
    assert total.last_step == StepComposition(num_prefill_tokens=7, num_denoise_canvases=5)
    assert total.last_timing.execute_s == 0.3, "the cores step side by side: the longest"
    assert [r.finish_reason for r in total.drain_records()] == ["stop", "length", "stop"]
    assert not one.records and not two.records
    combine_stats(total, [one, two])
    assert total.num_steps == 14 and not total.records, "combining again counts nothing twice"


class Cores:
    """Two started engine core clients of one checkpoint behind a `DataParallelClient`."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        build = functools.partial(build_engine_at, str(path), max_num_seqs=4)
        tokenizer = load_tokenizer(path)
        self.cores = [EngineCoreClient(build, tokenizer, num_threads=1) for _ in range(2)]
        self.client = DataParallelClient(self.cores, affinity_for(self.cores[0].config))
        self.run(self._start())

    async def _start(self) -> None:
        self.client.start()

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        self.client.shutdown()
        self.run(asyncio.sleep(0.01))
        self.loop.close()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_servable(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture
def cores(checkpoint_dir: Path) -> Iterator[Cores]:
    running = Cores(checkpoint_dir)
    yield running
    running.close()


async def _collect(client: DataParallelClient, prompt: list[int], seed: int) -> list[RequestOutput]:
    return [output async for output in client.generate(prompt, params(seed))]


def test_requests_spread_over_the_cores_with_one_core_s_outputs(cores: Cores, checkpoint_dir: Path) -> None:
    prompts = PROMPTS + PROMPTS[:1]
    offline = LLM.from_checkpoint(checkpoint_dir).generate(prompts, [params(i) for i in range(4)])

    async def all_of_them() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(_collect(cores.client, p, i) for i, p in enumerate(prompts)))

    for outputs, expected in zip(cores.run(all_of_them()), offline, strict=True):
        assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
        assert "".join(o.new_text for o in outputs) == expected.text
    per_core = [core.stats.num_output_tokens for core in cores.cores]  # before the total drains them
    assert all(tokens > 0 for tokens in per_core), f"both cores served: {per_core}"
    stats = cores.client.stats
    assert stats.finished_by_reason.get("length") == 4
    assert stats.num_output_tokens == sum(len(r.token_ids) for r in offline) == sum(per_core)
    assert len(stats.drain_records()) == 4
    assert cores.client.num_in_flight == 0


def test_a_conversation_s_next_turn_goes_to_the_core_that_cached_its_prefix(cores: Cores) -> None:
    """Least-busy routing alone would send the second turn to the other (idle, next in turn) core,
    which would compute the whole prompt again."""
    first = [2, *range(40, 40 + 2 * cores.cores[0].config.block_size)]
    turn_one = cores.run(_collect(cores.client, first, 0))
    reply = [t for o in turn_one for t in o.new_token_ids]
    cores.run(_collect(cores.client, [*first, *reply, *range(60, 70)], 1))
    served = [core.stats.num_output_tokens > 0 for core in cores.cores]
    hits = [core.stats.num_prefix_cache_hits for core in cores.cores]
    assert served.count(True) == 1, f"both turns on one core: {served}"
    assert hits[served.index(True)] >= 2 * cores.cores[0].config.block_size, hits


def test_aborts_and_broadcast_utilities_reach_the_cores(cores: Cores) -> None:
    async def start_then_abort() -> None:
        long = params(1, steps=1000)
        streams = [await cores.client.submit(PROMPTS[0], long, f"long-{i}") for i in range(2)]
        assert [core.num_in_flight for core in cores.cores] == [1, 1]
        cores.client.abort("long-1")
        last = [output async for output in streams[1]][-1]
        assert last.finish_reason == "abort"
        await streams[0].aclose()

    cores.run(start_then_abort())
    assert cores.run(cores.client.call_utility("reset_prefix_cache")) is True
    assert cores.run(cores.client.call_utility("has_unfinished")) is False


def test_one_dead_core_makes_the_client_dead_and_fails_its_streams(cores: Cores) -> None:
    async def killed_mid_stream() -> None:
        killed = False
        async for _ in cores.client.generate(PROMPTS[0], params(0, steps=1000), "r", want_canvas=True):
            if not killed:  # the request is on core 0: the first pick of a fresh client
                os.kill(cores.cores[0].process.pid, signal.SIGKILL)
                killed = True

    with pytest.raises(EngineDead, match="killed by SIGKILL"):
        cores.run(asyncio.wait_for(killed_mid_stream(), 60))
    assert not cores.client.is_alive and cores.cores[1].is_alive
