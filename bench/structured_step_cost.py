"""Per-step cost of constrained (grammar) and logprobs requests beside unconstrained ones in one batch.

A random checkpoint (`bench.common.SMALL_TEXT`, canvas 256) with a character tokenizer padded to the
vocabulary. Every request runs exactly `--steps` denoise steps per canvas (the stop rule is disabled),
so each request commits one canvas every `--steps` steps. Three batches of `--batch` requests, same
prompts and seeds:

- plain: every request unconstrained;
- half json: half of them constrained by a JSON schema (a random model's argmax is almost never
  valid, so the mask is filled at nearly every position: the worst case for the masked decode);
- half logprobs: half of them asking for 5 logprobs.

Reported: the median engine step, the time spent committing constrained/logprobs canvases (the masked
decode or the logprob tile, timed around `CanvasCommit.commit`) per step, and what that adds per
request and step relative to an unconstrained request's share of a step.

    python bench/structured_step_cost.py --batch 8 --steps 8 --canvases 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import SMALL_TEXT, load_average, save_random_checkpoint
from engine import commit as commit_module
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.model.loader import load_checkpoint
from engine.request import GrammarSpec, SamplingParams
from recipes.char_tokenizer import save_char_tokenizer

CANVAS = 256
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "tags", "score", "ok"],
}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


@dataclass
class Timer:
    """Total seconds spent in `CanvasCommit.commit` since the last reset."""

    seconds: float = 0.0
    calls: int = 0


def install_commit_timer(timer: Timer) -> None:
    real = commit_module.CanvasCommit.commit

    def timed(self: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(self, *args)
        finally:
            timer.seconds += time.perf_counter() - start
            timer.calls += 1

    commit_module.CanvasCommit.commit = timed  # type: ignore[method-assign]


def checkpoint_dir(root: Path, vocab_size: int, canvas_length: int = CANVAS) -> Path:
    save_random_checkpoint(root, SMALL_TEXT | {"vocab_size": vocab_size}, canvas_length)
    names = SPECIALS + [chr(c) for c in range(32, 127)]
    names += [f"<unused{i}>" for i in range(len(names), vocab_size)]
    save_char_tokenizer(root, names, SPECIALS, "{{ messages[0]['content'] }}")
    return root


def run_batch(engine: Engine, params: list[SamplingParams], timer: Timer) -> tuple[list[float], float]:
    """Step times of one batch run to the end, and the commit seconds it spent."""
    for i, p in enumerate(params):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", [2, *range(40, 72)], p)
    timer.seconds, timer.calls = 0.0, 0
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return steps, timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=SMALL_TEXT["vocab_size"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = Timer()
    install_commit_timer(timer)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(checkpoint_dir(Path(tmp), args.vocab))
    config = EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=args.batch * CANVAS + 512)
    engine = Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config)
    base = SamplingParams(
        max_tokens=args.canvases * CANVAS, max_denoising_steps=args.steps, confidence_threshold=1e-30
    )
    half = args.batch // 2
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    rows = {
        "plain": [replace(base, seed=i) for i in range(args.batch)],
        "half json": [
            replace(base, seed=i, grammar=grammar if i < half else None) for i in range(args.batch)
        ],
        "half logprobs": [replace(base, seed=i, logprobs=5 if i < half else None) for i in range(args.batch)],
    }
    run_batch(engine, rows["plain"][:2], timer)  # warm-up (and the grammar compiles once)
    engine.grammars.compile(grammar)
    print(
        f"vocab {args.vocab}, batch {args.batch}, {args.steps} steps per canvas, "
        f"up to {args.canvases} canvases of {CANVAS}; threads {args.threads}; load average {load_average()}"
    )
    header = "median step ms | mean step ms | commit ms/step | extra per asking request/step"
    print(f"{'batch':14s} | steps | {header}")
    plain_mean = 0.0
    for name, params in rows.items():
        steps, commit_s = run_batch(engine, params, timer)
        mean = statistics.mean(steps)
        if name == "plain":
            plain_mean = mean
        per_request = plain_mean / args.batch
        extra = (commit_s / len(steps)) / half if name != "plain" else 0.0
        median = 1000 * statistics.median(steps)
        print(
            f"{name:14s} | {len(steps):5d} | {median:14.1f} | {1000 * mean:12.1f} | "
            f"{1000 * commit_s / len(steps):14.2f} | {100 * extra / per_request:6.1f}% of its step share"
        )


if __name__ == "__main__":
    main()
