"""Where a prefix-cache hit's TTFT goes, in the engine: the admission step (the uncached prompt tail's
prefill and the first canvas's first denoise pass, in one forward), the later denoise passes, and the
scheduler's own time; and the same for a cold request, whose admission step prefills the whole prompt.

The bench model of `bench/prefix_cache.py` (`bench.common.SMALL_TEXT`, canvas 64) or a wider one
(`--model wide`: hidden 1024, 4x the MLPs, about 12x the FLOPs per token) where prefill weighs more
per token, as in real deployments. One engine, driven step by step in this process (no HTTP, no
queueing behind other requests); every repeat resets the prefix cache, runs a cold request (a
`--system-tokens` prompt plus a short question) to its end, then a hit (the same prompt, another
question). With `--split`, every repeat does it twice, the second time running each step that holds
both kinds of work as two forwards (causal work, then denoise work: what the engine would do without
packing a request's prefill and its first denoise pass into one forward): that times the prompt's
prefill on its own, measures what the packing saves, and checks that both give the same tokens.

    python bench/prefix_hit_profile.py --repeats 4
    python bench/prefix_hit_profile.py --model wide --repeats 3 --split
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import SMALL_TEXT, load_average, machine_header, save_random_checkpoint
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.model.loader import load_checkpoint
from engine.outputs import RunnerOutput, SchedulerOutput
from engine.request import SamplingParams

MODELS: dict[str, dict[str, Any]] = {
    "small": SMALL_TEXT,
    "wide": SMALL_TEXT
    | dict(
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=1024,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}


@dataclass
class Step:
    execute_s: float
    overhead_s: float
    """Scheduling and update (the engine's own time around the forward)."""
    prefill_tokens: int
    tail_tokens: int
    denoised: int
    causal_s: float | None = None
    """With --split: the causal forward alone (then `denoise_s`), run after the fused step's twin."""
    denoise_s: float | None = None


@dataclass
class Timeline:
    name: str
    ttft_s: float = 0.0
    steps_to_first_token: int = 0
    cached_tokens: int = 0
    steps: list[Step] = field(default_factory=list)
    tail_s: float = 0.0
    """Execute time of the steps that only wrote the request's cache tail."""
    token_ids: list[int] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="max_denoising_steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's engine: 1 here)")
    parser.add_argument("--split", action="store_true", help="also time causal and denoise forwards apart")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def split_execute(engine: Engine, out: SchedulerOutput) -> tuple[RunnerOutput, float, float]:
    """The step as two forwards, causal work first (the denoise reads what it wrote)."""
    t0 = time.perf_counter()
    engine.runner.execute(SchedulerOutput(causal=out.causal, dropped_request_ids=out.dropped_request_ids))
    t1 = time.perf_counter()
    result = engine.runner.execute(SchedulerOutput(denoise=out.denoise))
    return result, t1 - t0, time.perf_counter() - t1


def run_request(
    engine: Engine, request_id: str, prompt: list[int], args: argparse.Namespace, split: bool
) -> Timeline:
    """Step one request to its end (its cache tail included), timing every step."""
    params = SamplingParams(max_tokens=64, max_denoising_steps=args.steps, seed=len(prompt))
    timeline = Timeline(request_id)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    scheduler, done = engine.scheduler, False
    while engine.has_unfinished():
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        causal_s = denoise_s = None
        if split and out.denoise and out.causal:
            result, causal_s, denoise_s = split_execute(engine, out)
        else:
            result = engine.runner.execute(out)
        t2 = time.perf_counter()
        outputs = scheduler.update(out, result)
        t3 = time.perf_counter()
        composition = scheduler.last_step
        step = Step(
            t2 - t1,
            (t1 - t0) + (t3 - t2),
            composition.num_prefill_tokens,
            composition.num_tail_tokens,
            composition.num_denoise_canvases,
            causal_s,
            denoise_s,
        )
        if done:
            timeline.tail_s += step.execute_s
            continue
        timeline.steps.append(step)
        for output in outputs:
            timeline.token_ids += output.new_token_ids
            if output.new_token_ids and not timeline.ttft_s:
                timeline.ttft_s = t3 - start
                timeline.steps_to_first_token = len(timeline.steps)
            if output.finished:
                done = True
                assert output.usage is not None
                timeline.cached_tokens = output.usage.cached_tokens
    return timeline


def summary(timelines: list[Timeline]) -> dict[str, float]:
    """Medians over repeats of one kind."""

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    first = [t.steps[0] for t in timelines]
    later = [s.execute_s for t in timelines for s in t.steps[1 : t.steps_to_first_token]]
    row = {
        "ttft_s": med([t.ttft_s for t in timelines]),
        "steps_to_first_token": med([t.steps_to_first_token for t in timelines]),
        "cached_tokens": med([t.cached_tokens for t in timelines]),
        "prefill_tokens": med([s.prefill_tokens for s in first]),
        "admission_step_s": med([s.execute_s for s in first]),
        "later_denoise_step_s": med(later),
        "overhead_to_first_token_s": med(
            [sum(s.overhead_s for s in t.steps[: t.steps_to_first_token]) for t in timelines]
        ),
        "tail_pass_s": med([t.tail_s for t in timelines]),
    }
    causal = [s.causal_s for s in first if s.causal_s is not None]
    denoise = [s.denoise_s for s in first if s.denoise_s is not None]
    if causal:
        row["prefill_alone_s"] = med(causal)
        row["first_pass_alone_s"] = med(denoise)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_header() | {k: v for k, v in vars(args).items() if k != "json"}
    print(json.dumps(info, default=str), flush=True)
    rng = random.Random(0)
    system = [rng.randrange(5, 100) for _ in range(args.system_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(Path(tmp), MODELS[args.model], canvas_length=64)
        checkpoint = load_checkpoint(Path(tmp), with_tokenizer=False)
    engine = Engine(checkpoint.model, checkpoint.defaults, None, EngineConfig(max_num_seqs=8))
    modes = [False, True] if args.split else [False]
    runs: dict[str, list[Timeline]] = {}
    tokens: dict[tuple[int, str], list[list[int]]] = {}
    for repeat in range(args.repeats + 1):  # the first repeat warms up and is dropped
        questions = [[rng.randrange(5, 100) for _ in range(rng.randrange(12, 40))] for _ in range(2)]
        for split in modes if repeat % 2 == 0 else modes[::-1]:
            engine.reset_prefix_cache()
            for kind, question in zip(("cold", "hit"), questions, strict=True):
                name = kind + ("-split" if split else "")
                timeline = run_request(engine, f"{name}{repeat}", system + question, args, split)
                tokens.setdefault((repeat, kind), []).append(timeline.token_ids)
                brief = {k: v for k, v in asdict(timeline).items() if k != "token_ids"}
                print(f"repeat {repeat} load {load_average()}: {json.dumps(brief)}", flush=True)
                if repeat:
                    runs.setdefault(name, []).append(timeline)
    if any(outputs.count(outputs[0]) != len(outputs) for outputs in tokens.values()):
        raise AssertionError("a step run as two forwards gave other tokens than the packed step")
    rows = {kind: summary(timelines) for kind, timelines in runs.items()}
    print(json.dumps(rows, indent=1))
    for suffix in ("", "-split") if args.split else ("",):
        cold, hit = rows["cold" + suffix], rows["hit" + suffix]
        print(
            f"TTFT{suffix} cold {cold['ttft_s']:.3f} s, hit {hit['ttft_s']:.3f} s: "
            f"{cold['ttft_s'] / hit['ttft_s']:.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"header": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
