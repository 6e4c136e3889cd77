"""`DataParallelClient`: several engine core processes behind one `EngineClient` (vLLM's
`--data-parallel-size`).

On a CPU a small model's step does not scale with threads: at 16 canvases the Sudoku model's step
is hundreds of small ops, and a second OpenMP thread shortens it by about a fifth
(bench/RESULTS.md). Two engine cores of one thread each, every one with its own scheduler, runner,
model copy and KV cache, run two half-size batches side by side instead, and each core's step on
half the canvases costs well under its step on all of them. The same holds for several GPUs, one core
each.

Routing: with prefix caching on, a new request goes to the core that was sent the longest leading
part of its prompt (where that prefix's K/V is likely cached), unless that core is busier than the
least busy by more than a small slack (`engine.prefix_affinity`); otherwise, and with prefix caching
off, to the core with the fewest requests in flight, ties to the core after the one that took the
last request. A request stays on its core to the end, so its stream,
abort and statistics are that core's. What every core must agree on goes to all of them: aborting
(an unknown id is a no-op in a core), adapters loaded and unloaded at run time, resetting the prefix
cache. The statistics the metrics layer reads are the cores' sums (the KV usage is their mean, the
last step the cores' last steps added up), and the engine view lists the requests of every core.
The server is alive while every core is: one dead core turns /ready and generation into 503s, as a
single core's death does, rather than serving on at part strength unnoticed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

from engine.client import RequestStream, stream_outputs
from engine.config import DiffusionDefaults
from engine.core_client import EngineCoreClient
from engine.engine_config import EngineConfig
from engine.prefix_affinity import PrefixAffinity, pick_with_affinity
from engine.request import FinishReason, RequestOutput, SamplingParams
from engine.scheduler import StepComposition
from engine.snapshot import MAX_WAITING_ROWS, RequestsView
from engine.stats import EngineStats, StepTiming

BROADCAST_UTILITIES: dict[str, Callable[[list[Any]], Any]] = {
    "add_lora": lambda results: results[0],
    "remove_lora": lambda results: results[0],
    "reset_prefix_cache": all,
}
"""Engine methods every core runs (what one core's state must not differ in from another's), each with
how the cores' answers make one."""
CLEARS_AFFINITY = frozenset({"reset_prefix_cache"})
"""Broadcast utilities after which the router's memory of the cores' prefixes is stale."""


class DataParallelClient:
    """`EngineClient` over `cores` (started engine core clients of one model and settings); with
    `affinity`, requests are routed to the cores holding their prompts' prefixes."""

    def __init__(self, cores: Sequence[EngineCoreClient], affinity: PrefixAffinity | None = None) -> None:
        if not cores:
            raise ValueError("data parallelism needs at least one engine core")
        self.cores = list(cores)
        self.affinity = affinity
        self._stats = EngineStats()
        self._ids = itertools.count()
        self._next = 0

    # -- what every core says alike ---------------------------------------------------------------

    @property
    def defaults(self) -> DiffusionDefaults:
        return self.cores[0].defaults

    @property
    def config(self) -> EngineConfig:
        return self.cores[0].config

    @property
    def max_model_len(self) -> int:
        return self.cores[0].max_model_len

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        for core in self.cores:
            core.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        for core in self.cores:
            core.shutdown(timeout)

    @property
    def started(self) -> bool:
        return all(core.started for core in self.cores)

    @property
    def is_alive(self) -> bool:
        return all(core.is_alive for core in self.cores)

    @property
    def num_in_flight(self) -> int:
        return sum(core.num_in_flight for core in self.cores)

    # -- statistics and the engine view -----------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """The cores' statistics added up, with their queued records moved here (the metrics layer
        drains them from this object)."""
        combine_stats(self._stats, [core.stats for core in self.cores])
        return self._stats

    def requests(self) -> RequestsView:
        views = [core.requests() for core in self.cores]
        waiting = [row for view in views for row in view.waiting]
        return RequestsView(
            [row for view in views for row in view.running],
            waiting[:MAX_WAITING_ROWS],
            sum(view.num_waiting for view in views),
        )

    # -- requests ---------------------------------------------------------------------------------

    def pick_core(
        self, prompt_token_ids: Sequence[int] = (), lora_name: str | None = None
    ) -> EngineCoreClient:
        """The core for a new request (`pick_with_affinity`; with affinity off no core matches, so the
        least busy, the first such after the last one picked)."""
        count = len(self.cores)
        order = [(self._next + i) % count for i in range(count)]
        in_flight = [core.num_in_flight for core in self.cores]
        hashes = [] if self.affinity is None else self.affinity.hashes(prompt_token_ids, lora_name)
        matched = [0] * count if self.affinity is None else self.affinity.matched_blocks(hashes, count)
        index = pick_with_affinity(in_flight, matched, order)
        if self.affinity is not None:
            self.affinity.record(hashes, index)
        self._next = (index + 1) % count
        return self.cores[index]

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return stream_outputs(self, prompt_token_ids, params, request_id, want_canvas, lora_name)

    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> RequestStream:
        """Admit the request on `pick_core()`'s core; ids are unique across the cores."""
        request_id = request_id or f"dp-{next(self._ids)}"
        core = self.pick_core(prompt_token_ids, lora_name)
        return await core.submit(prompt_token_ids, params, request_id, want_canvas, lora_name)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        for core in self.cores:
            core.abort(request_id, reason)

    def abort_all(self) -> None:
        for core in self.cores:
            core.abort_all()

    async def call_utility(self, method: str, *args: Any) -> Any:
        """`BROADCAST_UTILITIES` run in every core (their answers combined as it says; any core's error
        raises, after all have answered); every other method asks the first core."""
        combine = BROADCAST_UTILITIES.get(method)
        if combine is None:
            return await self.cores[0].call_utility(method, *args)
        results = await asyncio.gather(
            *(core.call_utility(method, *args) for core in self.cores), return_exceptions=True
        )
        if method in CLEARS_AFFINITY and self.affinity is not None:
            self.affinity.clear()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return combine(results)


def combine_stats(total: EngineStats, parts: Sequence[EngineStats]) -> None:
    """Set `total` to the sum of `parts`: counters and gauges added (KV usage averaged), the last
    steps added up (their durations: the longest, as the cores step side by side), the finish reasons
    merged; the parts' queued records move to
    `total`'s queues."""
    for f in fields(EngineStats):
        if f.type in ("int", int):
            setattr(total, f.name, sum(getattr(part, f.name) for part in parts))
    total.kv_usage = sum(part.kv_usage for part in parts) / len(parts)
    reasons: dict[str, int] = {}
    for part in parts:
        for reason, count in part.finished_by_reason.copy().items():
            reasons[reason] = reasons.get(reason, 0) + count
    total.finished_by_reason = reasons
    total.last_step = _combine(StepComposition, [part.last_step for part in parts])
    total.last_step_request_ids = tuple(i for part in parts for i in part.last_step_request_ids)
    total.last_timing = _combine(StepTiming, [part.last_timing for part in parts], max)
    total.total_timing = _combine(StepTiming, [part.total_timing for part in parts])
    for part in parts:
        total.records.extend(part.drain_records())
        total.step_records.extend(part.drain_step_records())


def _combine(cls: Any, items: Sequence[Any], how: Callable[[Iterable[Any]], Any] = sum) -> Any:
    """A `cls` whose every field is `how` (sum, max) of that field over `items` (numeric fields)."""
    return cls(**{f.name: how(getattr(item, f.name) for item in items) for f in fields(cls)})
