"""Served vs offline on the Sudoku model: is HTTP as fast as the engine? (issue 21, items 5 and 6)

The same held-out Sudoku puzzles (`recipes/sudoku` evaluation set, `--per-band` per clue band), one
request per puzzle with seed = its index and the shipped sampler settings (adaptive stopping), fp32:

- offline: `LLM.generate` over all puzzles at once, `max_num_seqs` = `--concurrency` (16 at a time),
  once per `--offline-threads` value (torch threads of this process; 0: torch's default);
- served: `canvas-serve serve models/sudoku --max-num-seqs 16 --dtype float32` over HTTP,
  `--concurrency` clients in a closed loop (`bench/serve.py`'s load generator: streamed
  completions), with the engine in a thread of the API process (`--no-engine-process`) once per
  `--server-threads` value (its OMP_NUM_THREADS; 0: unset), and with the engine core in its own
  process once per `--engine-threads` value (0: the server's default).

Optional variants: `--system-allocator-threads` (the engine-process server on glibc's malloc, against
the default allocator), `--compile-engine-threads` (the engine-process server with `--compile`, warmed up
by `--concurrency` requests, which compile it), `--compile-data-parallel` (the same with
`--data-parallel-size N`, one torch thread per engine process: compared at N threads) and
`--reference-threads` (transformers' `generate` in static batches of `--concurrency`,
bench/throughput.py's reference, in this process; the table then compares every variant's committed
tokens/s with it, at the same torch thread count); `--dtype` sets
every variant's dtype (float32 by default).

Every variant runs `--rounds` times, interleaved (the order rotates each round) so that a change in
the machine's load hits all of them alike; the servers are started once, before the first round, and
warmed up. Per run: wall time, committed tokens/s, denoise passes (equal seeds give equal work, which
the table checks), puzzles solved, the 1-minute load average before and after, and the CPU seconds
each side spent (from /proc: the server process, and its engine core process apart; for offline, this
process), which a loaded machine inflates far less than wall time: served with the engine in its
own process, the engine's CPU time is the critical path, the API's runs beside it on another core.

    python bench/served.py --per-band 40 --concurrency 16 --rounds 3 --json /tmp/served.json
    python bench/served.py --dtype bfloat16 --offline-threads 1 --server-threads --engine-threads 1 \
        --compile-engine-threads 1 --reference-threads 1     # issue 21's 3x: served against transformers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, machine_header
from bench.serve import run_load, spawn_server, stop_server
from bench.throughput import run_reference_sudoku
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams
from recipes.sudoku import MODEL_DIR
from recipes.sudoku.data import EVAL_SEED, Pair, banded_set
from recipes.sudoku.puzzles import consistent, from_string, is_valid_solution, to_string


@dataclass
class Run:
    variant: str
    round: int
    wall_s: float
    completion_tokens: int
    denoise_passes: int
    solved: int
    errors: int
    load_before: float | None
    load_after: float | None
    cpu_engine_s: float
    """CPU seconds of the process that steps the engine (offline: this one; served in a thread: the
    whole server)."""
    cpu_api_s: float = 0.0
    """CPU seconds of the API process beside an engine core process (0 otherwise)."""
    threads: int | None = None
    """Torch threads of whatever steps the model (None: the server's default, not known here)."""

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-band", type=int, default=40, help="held-out puzzles per clue band")
    parser.add_argument("--concurrency", type=int, default=16, help="clients, and max_num_seqs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--offline-threads", type=int, nargs="*", default=[0], help="offline variants (0: torch's default)"
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        nargs="*",
        default=[0],
        help="engine-thread server variants, by OMP_NUM_THREADS (0: unset)",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        nargs="*",
        default=[0],
        help="engine-process server variants, by --engine-threads (0: the server's default)",
    )
    parser.add_argument(
        "--system-allocator-threads",
        type=int,
        nargs="*",
        default=[],
        help="engine-process server variants with --cpu-allocator system (glibc's malloc; the others run "
        "the default, tcmalloc where installed), by --engine-threads",
    )
    parser.add_argument(
        "--compile-engine-threads",
        type=int,
        nargs="*",
        default=[],
        help="engine-process server variants with --compile, by --engine-threads (0: the default)",
    )
    parser.add_argument(
        "--compile-data-parallel",
        type=int,
        nargs="*",
        default=[],
        help="engine-process server variants with --compile and --data-parallel-size N (one torch thread "
        "per engine process), by N",
    )
    parser.add_argument(
        "--reference-threads",
        type=int,
        nargs="*",
        default=[],
        help="transformers generate variants (static batches of --concurrency), by torch threads",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every variant")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_children(server_pid: int) -> list[int]:
    """The server's engine core processes (multiprocessing's spawned children), if it has any."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == server_pid and b"spawn_main" in command and b"resource_tracker" not in command:
            found.append(int(entry.name))
    return found


def solved(text: str, puzzle: list[int]) -> bool:
    """81 digits forming a valid grid that keeps the clues (what `recipes.sudoku.eval` counts)."""
    cells = text.strip()
    if len(cells) != 81 or not cells.isdigit():
        return False
    grid = from_string(cells)
    return is_valid_solution(grid) and consistent(puzzle, grid)


def offline_runner(llm: LLM, pairs: list[Pair], threads: int) -> Callable[[int], Run]:
    """`LLM.generate` on every puzzle, with `threads` torch threads (0: torch's default)."""
    prompts = [to_string(puzzle) for puzzle, _ in pairs]
    params = [SamplingParams(seed=i) for i in range(len(pairs))]
    llm.generate(prompts[:2], params[:2])  # warm-up
    default_threads = torch.get_num_threads()
    label = f"{threads} torch threads" if threads else f"default: {default_threads} torch threads"

    def run(round_index: int) -> Run:
        torch.set_num_threads(threads or default_threads)
        load = load_average()
        start, cpu = time.perf_counter(), time.process_time()
        results = llm.generate(prompts, params)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        torch.set_num_threads(default_threads)
        return Run(
            f"offline LLM.generate ({label})",
            round_index,
            wall,
            sum(len(r.token_ids) for r in results),
            sum(r.usage.denoise_steps if r.usage else 0 for r in results),
            sum(solved(r.text, puzzle) for r, (puzzle, _) in zip(results, pairs, strict=True)),
            0,
            load,
            load_average(),
            cpu,
            threads=threads or default_threads,
        )

    return run


def served_runner(
    name: str,
    server: subprocess.Popen[bytes],
    url: str,
    pairs: list[Pair],
    concurrency: int,
    threads: int | None,
) -> Callable[[int], Run]:
    bodies: list[dict[str, Any]] = [
        {
            "prompt": to_string(puzzle),
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i, (puzzle, _) in enumerate(pairs)
    ]
    asyncio.run(run_load(url, bodies[:concurrency], concurrency))  # warm-up (a compiled server compiles)
    engines = engine_children(server.pid)

    def run(round_index: int) -> Run:
        load = load_average()
        api_cpu, engine_cpu = cpu_seconds(server.pid), sum(cpu_seconds(pid) for pid in engines)
        samples, errors, wall = asyncio.run(run_load(url, bodies, concurrency))
        api_cpu = cpu_seconds(server.pid) - api_cpu
        engine_cpu = sum(cpu_seconds(pid) for pid in engines) - engine_cpu if engines else api_cpu
        return Run(
            name,
            round_index,
            wall,
            sum(s.completion_tokens for s in samples),
            sum(s.denoise_steps for s in samples),
            sum(solved(s.text, pairs[s.index][0]) for s in samples),
            errors,
            load,
            load_average(),
            engine_cpu,
            api_cpu if engines else 0.0,
            threads,
        )

    return run


def reference_runner(
    pairs: list[Pair], concurrency: int, dtype: torch.dtype, threads: int
) -> Callable[[int], Run]:
    """transformers' `generate` in static batches of `concurrency` (`bench/throughput.py`'s reference)."""
    default_threads = torch.get_num_threads()

    def run(round_index: int) -> Run:
        torch.set_num_threads(threads or default_threads)
        load = load_average()
        side, solve_rate = run_reference_sudoku(pairs, concurrency, dtype)
        torch.set_num_threads(default_threads)
        return Run(
            f"transformers generate, static batches ({threads or default_threads} torch threads)",
            round_index,
            side.wall_s,
            round(side.tokens_per_s * side.wall_s),
            0,
            round(solve_rate * len(pairs)),
            0,
            load,
            load_average(),
            side.cpu_s,
            threads=threads or default_threads,
        )

    return run


def server_variants(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str], int | None]]:
    """(label, flags, environment, torch threads or None for the default) of each server to start."""
    base = ["--max-num-seqs", str(args.concurrency), "--dtype", args.dtype, "--device", "cpu"]
    variants = []
    for threads in args.server_threads:
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        label = f"OMP_NUM_THREADS={threads}" if threads else "default threads"
        variants.append(
            (f"served, engine thread ({label})", [*base, "--no-engine-process"], env, threads or None)
        )
    for threads in args.engine_threads:
        flags = [*base, "--engine-process"] + (["--engine-threads", str(threads)] if threads else [])
        label = f"{threads} torch threads" if threads else "default threads"
        variants.append((f"served, engine process ({label})", flags, {}, threads or None))
    for threads in args.system_allocator_threads:
        flags = [*base, "--engine-process", "--cpu-allocator", "system", "--engine-threads", str(threads)]
        label = f"{threads} torch threads, glibc malloc"
        variants.append((f"served, engine process ({label})", flags, {}, threads))
    for threads in args.compile_engine_threads:
        flags = [*base, "--engine-process", "--compile"]
        flags += ["--engine-threads", str(threads)] if threads else []
        label = f"{threads} torch threads" if threads else "default threads"
        variants.append((f"served, engine process, --compile ({label})", flags, {}, threads or None))
    for size in args.compile_data_parallel:
        flags = [*base, "--engine-process", "--compile", "--engine-threads", "1"]
        flags += ["--data-parallel-size", str(size)]
        label = f"{size} engine processes of 1 torch thread"
        variants.append((f"served, --compile --data-parallel-size {size} ({label})", flags, {}, size))
    return variants


def versus_reference(variant: str, threads: dict[str, int | None], rates: dict[str, float]) -> str:
    """Committed tokens/s against transformers at the same torch thread count (the first one when
    the variant's is not known, marked *); '-' without a transformers variant."""
    references = [v for v in threads if v.startswith("transformers")]
    if not references:
        return "-"
    same = [v for v in references if threads[variant] is not None and threads[v] == threads[variant]]
    reference = (same or references)[0]
    return f"{rates[variant] / rates[reference]:.2f}x{'' if same else '*'}"


def table(runs: list[Run]) -> str:
    """Median over rounds per variant, and its throughput relative to offline."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    medians = {v: statistics.median(r.wall_s for r in runs if r.variant == v) for v in variants}
    offline = next((v for v in variants if v.startswith("offline")), variants[0])
    rates = {v: next(r.completion_tokens for r in runs if r.variant == v) / medians[v] for v in variants}
    threads = {v: next(r.threads for r in runs if r.variant == v) for v in variants}
    lines = [
        "| variant | runs | wall s (median) | wall s (all) | committed tok/s | vs offline | vs transformers "
        "| engine CPU s | API CPU s | denoise passes | solved | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        mine = [r for r in runs if r.variant == v]
        tokens = mine[0].completion_tokens
        engine_cpu = statistics.median(r.cpu_engine_s for r in mine)
        api_cpu = statistics.median(r.cpu_api_s for r in mine)
        lines.append(
            f"| {v} | {len(mine)} | {medians[v]:.2f} | {', '.join(f'{r.wall_s:.2f}' for r in mine)} "
            f"| {tokens / medians[v]:.0f} | {medians[offline] / medians[v]:.2f}x "
            f"| {versus_reference(v, threads, rates)} | {engine_cpu:.1f} "
            f"| {api_cpu:.1f} | {'/'.join(sorted({str(r.denoise_passes) for r in mine}))} | {mine[0].solved} "
            f"| {sum(r.errors for r in mine)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = machine_header() | {k: v for k, v in vars(args).items() if k != "json"}
    print(json.dumps(header, default=str), flush=True)
    pairs = [pair for band in banded_set(args.per_band, EVAL_SEED).values() for pair in band]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        dtype = getattr(torch, args.dtype)
        llm = LLM.from_checkpoint(MODEL_DIR, EngineConfig(max_num_seqs=args.concurrency), dtype=dtype)
        runners = [offline_runner(llm, pairs, threads) for threads in args.offline_threads]
        runners += [reference_runner(pairs, args.concurrency, dtype, t) for t in args.reference_threads]
        for name, flags, env, threads in server_variants(args):
            process, url = spawn_server(MODEL_DIR, flags, env)
            servers.append(process)
            runners.append(served_runner(name, process, url, pairs, args.concurrency, threads))
        runs = []
        for round_index in range(args.rounds):
            shift = round_index % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                runs.append(runner(round_index))
                r = runs[-1]
                print(
                    f"round {round_index}: {r.variant}: {r.wall_s:.2f}s, {r.tokens_per_s:.0f} tok/s, "
                    f"{r.denoise_passes} passes, {r.solved} solved, {r.errors} errors, "
                    f"CPU s engine {r.cpu_engine_s:.1f} API {r.cpu_api_s:.1f}, "
                    f"load {r.load_before} -> {r.load_after}",
                    flush=True,
                )
    finally:
        for process in servers:
            stop_server(process)
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": [asdict(r) for r in runs]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
