"""Guided denoising on and off: validity before the commit's repair, steps, and per-step cost.

Four engine settings (`EngineConfig.guided_pin_skeleton`, `guided_renoise`): off, pin, renoise, both.
For each, on a random checkpoint (`bench.common.SMALL_TEXT`, a character tokenizer padded to the
vocabulary), one run of:

- validity: the schemas of tests/engine/test_structured.py's battery, `--seeds` requests each, the
  checkpoint's sampler settings but at most `--steps` steps a canvas. "Repaired" counts what the commit
  had to override: the canvases whose argmax the grammar did not take as it was, and the decoded
  positions it changed (a random model knows no JSON, so without guidance nearly every canvas is
  repaired: the constraint alone carries validity). Every output is also checked with `jsonschema`;
- cost: a batch of `--batch` requests, half constrained by a 4-key JSON schema, every canvas exactly
  `--steps` steps (stop rule off); the mean step, and the guidance's own time (pins at a canvas's
  start, the walk and re-noise after each step) per step and constrained request, against one
  request's share of an all-unconstrained batch's step (timed in the same run).

    python bench/guided_denoising.py --seeds 20 --steps 8 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import torch

from bench.common import SMALL_TEXT, load_average
from bench.structured_step_cost import SCHEMA, checkpoint_dir
from engine import commit as commit_module
from engine import guided_denoise
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import GrammarSpec, SamplingParams
from tests.engine.test_structured import BATTERY

SETTINGS = {
    "off": (False, False),
    "pin": (True, False),
    "renoise": (False, True),
    "pin + renoise": (True, True),
}
"""Row name -> (guided_pin_skeleton, guided_renoise)."""


@dataclass
class Repairs:
    """What the commit-time decode changed, and what re-noising did, since the last reset."""

    canvases: int = 0
    repaired_canvases: int = 0
    positions: int = 0
    repaired_positions: int = 0
    walks: int = 0
    """Steps whose accepted run was walked under the grammar (re-noising on)."""
    renoised: int = 0
    """Of those, the steps that re-noised a refused token."""

    def reset(self) -> None:
        self.canvases = self.repaired_canvases = self.positions = self.repaired_positions = 0
        self.walks = self.renoised = 0

    def summary(self) -> str:
        share = self.repaired_positions / max(self.positions, 1)
        walked = f"; {self.renoised}/{self.walks} walks re-noised a token" if self.walks else ""
        return (
            f"{self.repaired_canvases}/{self.canvases} canvases repaired, "
            f"{self.repaired_positions}/{self.positions} positions ({100 * share:.1f}%){walked}"
        )


def count_repairs(repairs: Repairs) -> None:
    """Count every commit's overrides of the argmax and every re-noising walk (wraps
    `engine.commit.decode_under_grammar` and `engine.guided_denoise.first_refused`)."""
    real = commit_module.decode_under_grammar

    def counted(logits: Any, argmax: list[int], *args: Any) -> tuple[list[int], bool]:
        tokens, ended = real(logits, argmax, *args)
        changed = sum(t != a for t, a in zip(tokens, argmax, strict=False))
        repairs.canvases += 1
        repairs.repaired_canvases += changed > 0
        repairs.positions += len(tokens)
        repairs.repaired_positions += changed
        return tokens, ended

    commit_module.decode_under_grammar = counted  # type: ignore[assignment]
    walk = guided_denoise.first_refused

    def walked(*args: Any) -> int | None:
        refused = walk(*args)
        repairs.walks += 1
        repairs.renoised += refused is not None
        return refused

    guided_denoise.first_refused = walked  # type: ignore[assignment]


@dataclass
class Seconds:
    total: float = 0.0


def time_guidance(spent: Seconds) -> None:
    """Add the time of `CanvasCommit.pins` and `CanvasCommit.guide` to `spent`."""
    for name in ("pins", "guide"):
        real = getattr(commit_module.CanvasCommit, name)

        def timed(self: Any, *args: Any, _real: Callable[..., Any] = real) -> Any:
            start = time.perf_counter()
            try:
                return _real(self, *args)
            finally:
                spent.total += time.perf_counter() - start

        setattr(commit_module.CanvasCommit, name, timed)


def engine_for(checkpoint: Checkpoint, batch: int, canvas: int, pin: bool, renoise: bool) -> Engine:
    config = EngineConfig(
        max_num_seqs=batch,
        max_num_batched_tokens=batch * canvas + 512,
        guided_pin_skeleton=pin,
        guided_renoise=renoise,
    )
    return Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config)


def validity_row(engine: Engine, seeds: int, steps: int, repairs: Repairs) -> tuple[int, int, float]:
    """(valid outputs, outputs, mean steps per canvas) over the battery; `repairs` counts the commits."""
    llm = LLM(engine)
    valid = total = 0
    steps_per_canvas: list[int] = []
    repairs.reset()
    for name, schema in BATTERY.items():
        spec = GrammarSpec("json_schema", json.dumps(schema))
        params = [
            SamplingParams(max_tokens=512, max_denoising_steps=steps, seed=s, grammar=spec)
            for s in range(seeds)
        ]
        for result in llm.generate([[2, 40 + s % 50] for s in range(seeds)], params):
            total += 1
            steps_per_canvas += result.steps_per_canvas
            try:
                jsonschema.validate(json.loads(result.text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                print(f"  invalid ({name}): {result.text!r}")
    return valid, total, statistics.mean(steps_per_canvas)


def cost_row(engine: Engine, params: list[SamplingParams]) -> list[float]:
    """Step times of one batch run to the end."""
    for i, p in enumerate(params):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", [2, *range(40, 72)], p)
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--canvases", type=int, default=2, help="canvases per request in the cost batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repairs, spent = Repairs(), Seconds()
    count_repairs(repairs)
    time_guidance(spent)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(checkpoint_dir(Path(tmp), SMALL_TEXT["vocab_size"], args.canvas))
    print(
        f"random SMALL_TEXT, vocab {SMALL_TEXT['vocab_size']}, canvas {args.canvas}; threads {args.threads}; "
        f"load average {load_average()}"
    )
    print(
        f"validity: battery of {len(BATTERY)} schemas x {args.seeds} seeds, "
        f"at most {args.steps} steps a canvas"
    )
    for name, (pin, renoise) in SETTINGS.items():
        engine = engine_for(checkpoint, args.seeds, args.canvas, pin, renoise)
        valid, total, steps = validity_row(engine, args.seeds, args.steps, repairs)
        print(f"  {name:14s} | valid {valid}/{total} | {steps:5.2f} steps/canvas | {repairs.summary()}")

    base = SamplingParams(
        max_tokens=args.canvases * args.canvas, max_denoising_steps=args.steps, confidence_threshold=1e-30
    )
    half = args.batch // 2
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    plain = [replace(base, seed=i) for i in range(args.batch)]
    mixed = [replace(base, seed=i, grammar=grammar if i < half else None) for i in range(args.batch)]
    print(
        f"cost: batch {args.batch} (half constrained), {args.steps} steps a canvas, "
        f"load average {load_average()}"
    )
    print(
        "  row            | plain step ms | mixed step ms | guidance ms/step | per constrained request/step"
    )
    for name, (pin, renoise) in SETTINGS.items():
        engine = engine_for(checkpoint, args.batch, args.canvas, pin, renoise)
        cost_row(engine, plain[:2])  # warm-up, and the grammar compiles once
        engine.grammars.compile(grammar)
        plain_steps = cost_row(engine, plain)
        spent.total = 0.0
        mixed_steps = cost_row(engine, mixed)
        plain_mean, mixed_mean = statistics.mean(plain_steps), statistics.mean(mixed_steps)
        guidance = spent.total / len(mixed_steps)
        share = plain_mean / args.batch
        print(
            f"  {name:14s} | {1000 * plain_mean:13.1f} | {1000 * mixed_mean:13.1f} | "
            f"{1000 * guidance:16.2f} | {100 * guidance / half / share:5.2f}% of its step share"
        )


if __name__ == "__main__":
    main()
