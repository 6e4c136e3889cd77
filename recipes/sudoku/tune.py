"""Tune the sampler defaults (generation_config.json) on the validation split, never on the eval set.

Tries a grid of entropy bound, confidence threshold, stability threshold and temperature range (each a
list on the command line; the defaults span the reference's values: entropy bound 0.1, T 0.8 -> 0.4,
confidence 0.005) through the engine, prints solve rate and median steps per band for each, and with
`--write` stores the chosen setting in the checkpoint's generation_config.json. The choice: the highest
mean solve rate over the 36-45 and 28-35 bands among settings whose median steps per solved puzzle is at
most `--max-median` in both bands (ties: fewer steps).

    python -m recipes.sudoku.tune --model models/sudoku --write
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from recipes.sudoku import MODEL_DIR
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import VALID_SEED, banded_set
from recipes.sudoku.eval import run_band


def parse_range(text: str) -> tuple[float, float]:
    """ "0.4,0.8" -> (0.4, 0.8): t_min, t_max of the temperature schedule."""
    low, high = (float(v) for v in text.split(","))
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tune generation_config.json on the validation split")
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--per-band", type=int, default=50)
    parser.add_argument("--max-median", type=float, default=12)
    add_threads_option(parser)
    parser.add_argument("--entropy-bound", nargs="+", type=float, default=[0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--confidence", nargs="+", type=float, default=[0.005, 0.0005])
    parser.add_argument("--stability", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--temperatures",
        nargs="+",
        type=parse_range,
        default=[(0.4, 0.8), (0.6, 1.0), (0.8, 1.2)],
        help="t_min,t_max pairs",
    )
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid: dict[str, list[Any]] = {
        "entropy_bound": args.entropy_bound,
        "confidence_threshold": args.confidence,
        "stability_threshold": args.stability,
        "t_range": args.temperatures,
    }
    checkpoint = load_checkpoint(args.model, with_tokenizer=False)
    sets = banded_set(args.per_band, VALID_SEED, bands=("36-45", "28-35"))
    scored = []
    for values in itertools.product(*grid.values()):
        knobs = dict(zip(grid, values, strict=True))
        t_min, t_max = knobs.pop("t_range")
        knobs |= {"t_min": t_min, "t_max": t_max}
        results = {
            band: run_band(
                checkpoint.model,
                checkpoint.defaults,
                pairs,
                lambda seed, _puzzle, k=knobs: SamplingParams(seed=seed, **k),
                batch=args.per_band,
            )
            for band, pairs in sets.items()
        }
        rate = statistics.mean(r.solve_rate for r in results.values())
        medians = [statistics.median(r.solved_steps) if r.solved_steps else 99 for r in results.values()]
        scored.append((rate, -max(medians), knobs))
        cells = "  ".join(f"{band} {r.cell()}" for band, r in results.items())
        print(f"{json.dumps(knobs)}  {cells}", flush=True)
    eligible = [s for s in scored if -s[1] <= args.max_median] or scored
    rate, neg_median, best = max(eligible, key=lambda s: (s[0], s[1]))
    print(f"chosen: {json.dumps(best)} (mean solve rate {rate:.3f}, worst median steps {-neg_median:g})")
    if args.write:
        path = args.model / "generation_config.json"
        data = json.loads(path.read_text())
        data["sampler_config"]["entropy_bound"] = best["entropy_bound"]
        for key in ("confidence_threshold", "stability_threshold", "t_min", "t_max"):
            data[key] = best[key]
        path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
