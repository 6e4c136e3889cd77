"""Serving throughput: our continuous-batching engine against transformers' static-batch `generate`.

What it measures, for concurrency c in 1, 4, 16, 64 on a small random DiffusionGemma checkpoint (CPU):
- ours: c clients in a closed loop send the same prompts through `AsyncEngine` (one background
  engine thread, the scheduler packing prefill chunks, commits and c canvases per forward);
- reference: the same prompts in static batches of c through `DiffusionGemmaForBlockDiffusion.generate`
  (left padding, one DynamicCache per batch; a request's latency is its batch's duration).
Both do equal work: every request fills 2 canvases with exactly `--steps` denoise steps each (the
confidence threshold is set so low that adaptive stopping never fires, as in vLLM's fixed-16-step
setting) and stop ids are disabled, so each request commits 2 * canvas_length tokens.

Reported: committed tokens/s, p50 and p99 request latency, ours/reference; the packing gain (our tok/s
at 16 over tok/s at 1); and the engine's overhead: the share of step time spent scheduling, updating
and detokenising, outside the runner's forward and sampler.

`--workload sudoku` measures real trained weights with adaptive stopping instead: the shipped Sudoku
model (`models/sudoku`, its generation_config.json on both sides) on the held-out puzzles
(`--per-band` from each clue band, `recipes.sudoku.data`), all queued at once through `LLM.generate`
with `max_num_seqs` = c against transformers' `generate` in static batches of c, `--dtype` on both
sides. Committed tokens are each output's tokens before `<eos>`; the solve rate of each side is
printed as a check that both did the real work.

Run: `python bench/throughput.py` (a few minutes on 2 cores), or
     `python bench/throughput.py --concurrency 1 4 --requests-per-client 2 --json /tmp/tp.json`,
     `python bench/throughput.py --workload sudoku --dtype bf16 --per-band 40 --threads 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import DiffusionGemmaForBlockDiffusion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import SMALL_TEXT, load_average, machine_header, save_random_checkpoint
from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.engine_config import EngineConfig, batched_tokens_for
from engine.llm import LLM
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from engine.warm_up import warm_up
from recipes.sudoku import MODEL_DIR as SUDOKU_DIR
from recipes.sudoku import tokens as sudoku_tokens
from recipes.sudoku.data import EVAL_SEED, Pair, banded_set
from recipes.sudoku.eval import solves

CANVAS = 64
BLOCKS = 2
NEVER_CONFIDENT = 1e-9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Side:
    tokens_per_s: float
    p50_s: float
    p99_s: float
    wall_s: float
    cpu_s: float = 0.0
    """Process CPU time of the run (sudoku workload): on a shared machine, wall time also counts the
    time other processes held the cores, CPU time much less so."""

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens_per_s * self.wall_s / self.cpu_s if self.cpu_s else 0.0


@dataclass
class Row:
    concurrency: int
    requests: int
    ours: Side
    reference: Side
    overhead_fraction: float
    compiled: bool = False
    """Ours ran with `EngineConfig.compile`."""

    @property
    def ratio(self) -> float:
        return self.ours.tokens_per_s / self.reference.tokens_per_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="denoise steps per canvas (fixed)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workload", choices=["synthetic", "sudoku"], default="synthetic")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="both sides (sudoku workload)"
    )
    parser.add_argument("--per-band", type=int, default=40, help="held-out puzzles per clue band (sudoku)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="sudoku: also time our engine with EngineConfig.compile (after a warm-up that compiles)",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(5, 4000) for _ in range(rng.randrange(31, 96))] for _ in range(count)]


def sampling(steps: int, seed: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=BLOCKS * CANVAS,
        max_denoising_steps=steps,
        confidence_threshold=NEVER_CONFIDENT,
        stop_token_ids=(),
        seed=seed,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def side(latencies: list[float], tokens: int, wall: float) -> Side:
    return Side(tokens / wall, statistics.median(latencies), percentile(latencies, 0.99), wall)


# ------------------------------------------------------------------------------------------ ours


async def _client(
    engine: AsyncEngine, queue: list[tuple[int, list[int]]], steps: int, latencies: list[float]
) -> int:
    tokens = 0
    while queue:
        index, prompt = queue.pop()
        start = time.perf_counter()
        async for event in engine.generate(prompt, sampling(steps, index)):
            tokens += len(event.new_token_ids)
        latencies.append(time.perf_counter() - start)
    return tokens


def run_ours(path: Path, prompts: list[list[int]], concurrency: int, steps: int) -> tuple[Side, float]:
    checkpoint = load_checkpoint(path, with_tokenizer=False)
    budget = batched_tokens_for(concurrency, CANVAS, prefill_chunk=512)
    config = EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=budget)
    engine = Engine(checkpoint.model, checkpoint.defaults, None, config)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    queue = list(enumerate(prompts))[::-1]
    latencies: list[float] = []

    async def main() -> int:
        counts = await asyncio.gather(
            *(_client(async_engine, queue, steps, latencies) for _ in range(concurrency))
        )
        return sum(counts)

    try:
        start = time.perf_counter()
        tokens = asyncio.run(main())
        wall = time.perf_counter() - start
    finally:
        async_engine.shutdown()
    timing = engine.stats.total_timing
    overhead = (timing.schedule_s + timing.update_s) / timing.total_s
    assert tokens == len(prompts) * BLOCKS * CANVAS, tokens
    return side(latencies, tokens, wall), overhead


# ------------------------------------------------------------------------------------- reference


def run_reference(path: Path, prompts: list[list[int]], concurrency: int, steps: int) -> Side:
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        batch = prompts[first : first + concurrency]
        t0 = time.perf_counter()
        tokens += _reference_batch(model, batch, steps)
        latencies += [time.perf_counter() - t0] * len(batch)
    wall = time.perf_counter() - start
    return side(latencies, tokens, wall)


def _reference_batch(model: DiffusionGemmaForBlockDiffusion, batch: list[list[int]], steps: int) -> int:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=BLOCKS * CANVAS,
            max_denoising_steps=steps,
            confidence_threshold=NEVER_CONFIDENT,
            eos_token_id=None,
            pad_token_id=0,
        )
    return int(out.sequences[:, width:].numel())


# ----------------------------------------------------------------------------------- sudoku workload


def sudoku_puzzles(per_band: int) -> list[Pair]:
    """The first `per_band` held-out puzzles of each clue band (the eval's sets, seed `EVAL_SEED`)."""
    sets = banded_set(max(per_band, 100), EVAL_SEED)
    return [pair for pairs in sets.values() for pair in pairs[:per_band]]


def before_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(sudoku_tokens.EOS)] if sudoku_tokens.EOS in ids else ids


def run_ours_sudoku(
    puzzles: list[Pair], concurrency: int, dtype: torch.dtype, compile: bool = False
) -> tuple[Side, float, float]:
    """All puzzles queued at once through `LLM.generate`, at most `concurrency` running: (side, engine
    overhead, solve rate). With `compile`, the server's warm-up (`engine.warm_up`) compiles the layers
    first (its time is printed, not counted)."""
    checkpoint = load_checkpoint(SUDOKU_DIR, dtype=dtype, with_tokenizer=False)
    canvas = checkpoint.model.config.canvas_length
    budget = batched_tokens_for(concurrency, canvas, prefill_chunk=512)
    config = EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=budget, compile=compile)
    engine = Engine(checkpoint.model, checkpoint.defaults, None, config)
    prompts = [sudoku_tokens.prompt_ids(p) for p, _ in puzzles]
    if compile:
        print(f"  compile warm-up: {warm_up(engine):.1f} s", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    results = LLM(engine).generate(prompts, [SamplingParams(seed=i) for i in range(len(prompts))])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    records = list(engine.stats.records)
    latencies = [r.e2e_s for r in records]
    tokens = sum(len(before_eos(r.token_ids)) for r in results)
    solved = sum(solves(r.token_ids, p) for r, (p, _) in zip(results, puzzles, strict=True))
    timing = engine.stats.total_timing
    overhead = (timing.schedule_s + timing.update_s) / timing.total_s
    return replace(side(latencies, tokens, wall), cpu_s=cpu), overhead, solved / len(puzzles)


def run_reference_sudoku(puzzles: list[Pair], concurrency: int, dtype: torch.dtype) -> tuple[Side, float]:
    """Static batches of `concurrency` through transformers' `generate` with the checkpoint's
    generation_config.json (every prompt has 82 tokens: no padding). (side, solve rate)."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(SUDOKU_DIR, dtype=dtype).eval()
    latencies: list[float] = []
    tokens = solved = 0
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(puzzles), concurrency):
        batch = puzzles[first : first + concurrency]
        ids = torch.tensor([sudoku_tokens.prompt_ids(p) for p, _ in batch])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids))
        latencies += [time.perf_counter() - t0] * len(batch)
        for row, (puzzle, _) in zip(out.sequences[:, ids.shape[1] :].tolist(), batch, strict=True):
            output = before_eos(row)
            tokens += len(output)
            solved += solves(output, puzzle)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return replace(side(latencies, tokens, wall), cpu_s=cpu), solved / len(puzzles)


def main_sudoku(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    puzzles = sudoku_puzzles(args.per_band)
    info = machine_header() | {"workload": "sudoku", "dtype": args.dtype, "puzzles": len(puzzles)}
    print(json.dumps(info), flush=True)
    rows = []
    for c in args.concurrency:
        reference, ref_solved = run_reference_sudoku(puzzles, c, dtype)
        for compiled in (False, True) if args.compile else (False,):
            ours, overhead, ours_solved = run_ours_sudoku(puzzles, c, dtype, compiled)
            rows.append(Row(c, len(puzzles), ours, reference, overhead, compiled))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            print(
                f"  solved: ours {ours_solved:.1%}, reference {ref_solved:.1%}; tokens per CPU-second: "
                f"ours {ours.tokens_per_cpu_s:.0f}, reference {reference.tokens_per_cpu_s:.0f} "
                f"({ours.tokens_per_cpu_s / reference.tokens_per_cpu_s:.2f}x)",
                flush=True,
            )
    print(format_table(rows))
    print(f"load average now {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"header": info, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------- report


def format_table(rows: list[Row]) -> str:
    lines = [
        "| concurrency | requests | ours tok/s | ours p50 s | ours p99 s | ref tok/s | ref p50 s | ref p99 s "
        "| ours/ref | engine overhead |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.concurrency}{' (compiled)' if r.compiled else ''} | {r.requests} "
            f"| {r.ours.tokens_per_s:.0f} | {r.ours.p50_s:.2f} "
            f"| {r.ours.p99_s:.2f} | {r.reference.tokens_per_s:.0f} | {r.reference.p50_s:.2f} "
            f"| {r.reference.p99_s:.2f} | {r.ratio:.2f}x | {100 * r.overhead_fraction:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.workload == "sudoku":
        return main_sudoku(args)
    info = machine_header() | {"canvas_length": CANVAS, "blocks": BLOCKS, "steps": args.steps}
    print(json.dumps(info))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        save_random_checkpoint(path, SMALL_TEXT, CANVAS)
        for c in args.concurrency:
            prompts = make_prompts(max(args.min_requests, c * args.requests_per_client), seed=c)
            ours, overhead = run_ours(path, prompts, c, args.steps)
            reference = run_reference(path, prompts, c, args.steps)
            rows.append(Row(c, len(prompts), ours, reference, overhead))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    by_c = {r.concurrency: r for r in rows}
    if 1 in by_c and 16 in by_c:
        gain = by_c[16].ours.tokens_per_s / by_c[1].ours.tokens_per_s
        print(f"packing gain (ours, tok/s at 16 / at 1): {gain:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"header": info, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
