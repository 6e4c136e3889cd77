"""Evaluate the Sudoku model through the engine on a held-out set: solve rate and denoise steps per solve.

The held-out set has `--per-band` puzzles in each clue band (36-45, 28-35, 22-27), generated with its own
seed and checked disjoint from the training pool. Every puzzle goes through `engine.generate.generate`
(the serving path: prompt prefill, paged cache, packed denoise steps, the entropy-bound sampler), several
puzzles per call. A puzzle counts as solved when the output is exactly 81 digits forming a valid grid
that keeps every clue. Rows:

- adaptive: the shipped generation_config.json (adaptive stopping);
- pinned clues: the same, with the clues pinned on the canvas (infilling);
- fixed 48 steps: the stop rule disabled (confidence threshold 1e-30), so every canvas runs 48 steps;
- single pass: max_denoising_steps = 1 (one forward, argmax);
- untrained, 48 steps: the initial checkpoint (same architecture and seed, before training).

`--adapter DIR` serves every request on the LoRA adapter in DIR (e.g. models/sudoku-hard) over the
model, as the server does (`Engine.add_lora`, `adapter_generate.py`); `--write` then records the table
in the adapter's sections of README.md and bench/RESULTS.md.

Rows already measured for the same weights, sampler defaults and set size are read from
recipes/sudoku/data/eval-cache.json instead of being run again.

    python -m recipes.sudoku.eval                      # prints the table
    python -m recipes.sudoku.eval --write              # also updates README.md and bench/RESULTS.md
    python -m recipes.sudoku.eval --adapter models/sudoku-hard --rows shipped
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.config import DiffusionDefaults
from engine.generate import generate
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from recipes.sudoku import MODEL_DIR, REPO_ROOT, tokens
from recipes.sudoku.adapter_generate import generate_with_adapter
from recipes.sudoku.checkpoint import init_checkpoint
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import BANDS, DATA_DIR, EVAL_SEED, Pair, banded_set, check_disjoint, minimal_pool
from recipes.sudoku.puzzles import consistent, is_valid_solution

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ParamsFor = Callable[[int, list[int]], SamplingParams]


@dataclass(frozen=True)
class BandResult:
    num_puzzles: int
    num_solved: int
    solved_steps: list[int]
    all_steps: list[int]
    seconds: float

    @property
    def solve_rate(self) -> float:
        return self.num_solved / self.num_puzzles

    def cell(self) -> str:
        if not self.solved_steps:
            return f"{100 * self.solve_rate:.0f}% (-)"
        median = statistics.median(self.solved_steps)
        mean = statistics.mean(self.solved_steps)
        return f"{100 * self.solve_rate:.0f}% ({median:g} / {mean:.1f})"


def solves(token_ids: list[int], puzzle: list[int]) -> bool:
    """Exactly 81 digits (the model stopped at `<eos>` right after them), a valid grid keeping the clues."""
    grid = tokens.grid_from_ids(token_ids)
    return len(token_ids) == 81 and is_valid_solution(grid) and consistent(puzzle, grid)


def outcomes(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    pairs: list[Pair],
    params_for: ParamsFor,
    batch: int,
    adapter: Path | None = None,
) -> list[tuple[bool, int]]:
    """Per puzzle: solved, and denoise steps taken; `batch` puzzles per `generate` call, on the LoRA
    adapter in `adapter` if given."""
    out: list[tuple[bool, int]] = []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo : lo + batch]
        prompts = [tokens.prompt_ids(p) for p, _ in chunk]
        params = [params_for(lo + i, p) for i, (p, _) in enumerate(chunk)]
        if adapter is None:
            results = generate(model, defaults, prompts, params)
        else:
            results = generate_with_adapter(model, defaults, prompts, params, adapter)
        for result, (puzzle, _) in zip(results, chunk, strict=True):
            out.append((solves(result.token_ids, puzzle), sum(result.steps_per_canvas)))
    return out


def run_band(
    model: DiffusionGemma,
    defaults: DiffusionDefaults,
    pairs: list[Pair],
    params_for: ParamsFor,
    batch: int,
    adapter: Path | None = None,
) -> BandResult:
    start = time.perf_counter()
    done = outcomes(model, defaults, pairs, params_for, batch, adapter)
    solved_steps = [steps for solved, steps in done if solved]
    all_steps = [steps for _, steps in done]
    return BandResult(len(pairs), len(solved_steps), solved_steps, all_steps, time.perf_counter() - start)


def adaptive(seed: int, puzzle: list[int]) -> SamplingParams:
    return SamplingParams(seed=seed)


def pinned(seed: int, puzzle: list[int]) -> SamplingParams:
    return SamplingParams(seed=seed, pinned_canvas=tokens.pinned_clues(puzzle))


def fixed_48(seed: int, puzzle: list[int]) -> SamplingParams:
    return SamplingParams(seed=seed, max_denoising_steps=48, confidence_threshold=1e-30)


def single_pass(seed: int, puzzle: list[int]) -> SamplingParams:
    return SamplingParams(seed=seed, max_denoising_steps=1)


def untrained_dir() -> Path:
    """The initial (untrained) checkpoint of the shipped recipe: same config and init seed."""
    path = DATA_DIR / "untrained"
    if not (path / "model.safetensors").is_file():
        init_checkpoint(path, seed=0)
    return path


def fingerprint(
    model_dir: Path, names: tuple[str, ...] = ("model.safetensors", "generation_config.json")
) -> str:
    """Identifies a checkpoint's weights and sampler defaults (or an adapter's files), so cached rows are
    reused only for them."""
    digest = hashlib.sha1()
    for name in names:
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:12]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def evaluate(
    model_dir: Path,
    per_band: int,
    batch: int,
    rows: list[str],
    cache_path: Path,
    dtype: torch.dtype = torch.float32,
    check_pool: bool = True,
    quantization: str | None = None,
    adapter: Path | None = None,
) -> dict[str, dict[str, BandResult]]:
    """Run (or reuse from `cache_path`) every row whose name contains one of `rows` (all if empty).

    `dtype` is the model's compute dtype; rows in another dtype than fp32 are cached under their own key.
    `check_pool=False` skips building the 6,000-puzzle training pool to check the held-out sets
    against (minutes on a busy machine; the sets themselves are seeded and the same either way).
    `quantization`: `--quantization` for loading (e.g. int8 quantises the weights at load).
    `adapter`: a LoRA adapter directory every request of the model's rows runs on (not the untrained row).
    """
    sets = banded_set(per_band, EVAL_SEED)
    if check_pool:
        check_disjoint(minimal_pool(6000), sets)
    untrained = untrained_dir()
    configs = {
        "adaptive (shipped settings)": (model_dir, adaptive),
        "adaptive + pinned clues": (model_dir, pinned),
        "fixed 48 steps": (model_dir, fixed_48),
        "single forward pass": (model_dir, single_pass),
        "untrained, fixed 48 steps": (untrained, fixed_48),
    }
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    table: dict[str, dict[str, BandResult]] = {}
    for name, (path, params_for) in configs.items():
        if rows and not any(r in name for r in rows):
            continue
        key = f"{name}|{fingerprint(path)}|{per_band}" + ("" if dtype == torch.float32 else f"|{dtype}")
        key += f"|{quantization}" if quantization else ""
        on_adapter = adapter if path == model_dir else None
        key += f"|lora {fingerprint(on_adapter, ADAPTER_FILES)}" if on_adapter else ""
        if key not in cache:
            checkpoint = load_checkpoint(path, dtype=dtype, with_tokenizer=False, quantization=quantization)
            cache[key] = {}
            for band, pairs in sets.items():
                result = run_band(checkpoint.model, checkpoint.defaults, pairs, params_for, batch, on_adapter)
                cache[key][band] = asdict(result)
                print(
                    f"{name:30s} {band}: {result.cell()}  [{result.seconds:.0f}s]",
                    file=sys.stderr,
                    flush=True,
                )
            cache_path.write_text(json.dumps(cache))
        table[name] = {band: BandResult(**cache[key][band]) for band in sets}
    return table


def markdown(
    table: dict[str, dict[str, BandResult]],
    per_band: int,
    model_dir: Path,
    dtype: str = "fp32",
    adapter: Path | None = None,
) -> str:
    bands = list(BANDS)
    served = f"model `{_relative(model_dir)}`, {dtype}, CPU, through `engine.generate`"
    if adapter is not None:
        served = (
            f"model `{_relative(model_dir)}` with the LoRA adapter `{_relative(adapter)}`, {dtype}, CPU, "
            "through the engine (`adapter_generate.py`: `Engine.add_lora`, every request on the adapter)"
        )
    lines = [
        f"Held-out puzzles: {per_band} per band (seed {EVAL_SEED}), disjoint from the training pool; "
        f"{served}. "
        "Cells: solve rate (median / mean denoise steps of the solved puzzles).",
        "",
        "| setting | " + " | ".join(f"{b} clues" for b in bands) + " |",
        "|---|" + "---|" * len(bands),
    ]
    for name, per_band_results in table.items():
        lines.append(f"| {name} | " + " | ".join(per_band_results[b].cell() for b in bands) + " |")
    return "\n".join(lines) + "\n"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def replace_section(text: str, start: str, end: str, body: str) -> str:
    """Replace what lies between the `start` and `end` marker lines (append both if absent)."""
    block = f"{start}\n{body}{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_results(body: str, adapter: bool = False) -> None:
    """The table into README.md and bench/RESULTS.md: the model's sections, or with `adapter` the
    `sudoku-hard` adapter's."""
    readme = Path(__file__).with_name("README.md")
    marker = "eval-lora" if adapter else "eval"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    readme.write_text(replace_section(readme.read_text() if readme.is_file() else "", start, end, body))
    results = REPO_ROOT / "bench" / "RESULTS.md"
    text = results.read_text() if results.is_file() else "# Results\n"
    if adapter:
        title = "## Sudoku LoRA adapter sudoku-hard (issue 23)\n\nMeasured by `python -m recipes.sudoku.eval "
        title += "--adapter models/sudoku-hard --write`; how it was trained in recipes/sudoku/README.md.\n\n"
        markers = ("<!-- sudoku-hard:start -->", "<!-- sudoku-hard:end -->")
    else:
        title = (
            "## Sudoku default model (issue 5)\n\nMeasured by `python -m recipes.sudoku.eval --write`; how "
            "the model was trained, and how far it is from the issue's targets, in "
            "recipes/sudoku/README.md.\n\n"
        )
        markers = ("<!-- sudoku:start -->", "<!-- sudoku:end -->")
    results.write_text(replace_section(text, *markers, title + body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sudoku solve rate through the engine")
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--per-band", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50, help="puzzles per generate call")
    parser.add_argument("--rows", nargs="*", default=[], help="only rows whose name contains one of these")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's compute dtype")
    parser.add_argument(
        "--no-pool-check",
        action="store_true",
        help="skip checking the held-out sets against the training pool",
    )
    parser.add_argument(
        "--quantization", default=None, help="as vLLM spells it: fp8 or int8 quantise the weights at load"
    )
    parser.add_argument(
        "--adapter", type=Path, default=None, help="a LoRA adapter directory to serve every request on"
    )
    add_threads_option(parser)
    parser.add_argument("--write", action="store_true", help="update README.md and bench/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = DATA_DIR / "eval-cache.json"
    table = evaluate(
        args.model,
        args.per_band,
        args.batch,
        args.rows,
        cache,
        DTYPES[args.dtype],
        not args.no_pool_check,
        args.quantization,
        args.adapter,
    )
    body = markdown(table, args.per_band, args.model, args.dtype, args.adapter)
    print(body)
    if args.write:
        if args.dtype != "fp32" or args.no_pool_check or args.quantization:
            parser.error(
                "--write records the checked fp32 table only: "
                "drop --write, or --dtype, --no-pool-check and --quantization"
            )
        write_results(body, adapter=args.adapter is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
