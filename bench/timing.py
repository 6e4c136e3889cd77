"""Timing helpers for benchmarks: interleaved wall and CPU times, the machine's matmul peak, top ops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timings:
    """Seconds per call of one function: wall clock, and CPU time of the whole process (all threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def record(self, fn: Callable[[], Any]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


def time_interleaved(fns: list[Callable[[], Any]], warmup: int, reps: int) -> list[Timings]:
    """Call the functions in turn (a, b, a, b, ...), so that load from elsewhere hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    timings = [Timings() for _ in fns]
    for _ in range(reps):
        for fn, timing in zip(fns, timings, strict=True):
            timing.record(fn)
    return timings


def median_ms(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """Median wall milliseconds of each function over `reps` interleaved calls, after two warm-ups each."""
    return [statistics.median(t.wall) * 1e3 for t in time_interleaved(fns, warmup=2, reps=reps)]


def matmul_gflops(dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """The machine's own dense matmul rate in GFLOP/s: the fastest of `reps` n x n x n `torch.mm`s.

    The fastest, not the median, because this is a peak: other load on the machine only slows it.
    """
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    (timing,) = time_interleaved([lambda: torch.mm(a, b)], warmup=2, reps=reps)
    return 2 * n**3 / min(timing.wall) / 1e9


def top_ops(fn: Callable[[], Any], row_limit: int = 12) -> str:
    """The ops of one call of `fn` with the most self CPU time, as torch.profiler's table."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
