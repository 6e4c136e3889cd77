"""Train the Sudoku DiffusionGemma on the engine's own model code (CPU-sized; seeded; resumable).

Objective (uniform-state diffusion, as the model guide describes): per example draw t ~ U(0, 1) and
replace each clean canvas token with a uniform random token over the full vocabulary with probability t;
the model reads the puzzle (causal prompt) and the noisy canvas (bidirectional) and is trained with
cross-entropy of its softcapped logits against the clean canvas at every canvas position.

Self-conditioning: on half of the steps a first no-grad pass over the noisy canvas gives logits;
divided by the temperature the sampler would use at that noise level (T = 0.4 + 0.4 t) they become soft
embeddings (`engine.sampler.soft_embedding`) for the graded pass.

Sampler-step canvases (an experiment, off in the shipped recipe: `--own-canvas-from F` turns them on
from the fraction F of the schedule): on self-conditioned steps the graded pass does not read the
uniformly corrupted canvas but the one a sampler step builds from the first pass, as at serving time: a
draw from the tempered prediction at the (1 - t) * C lowest-entropy positions, uniform noise at the
rest. The idea: uniform noise is easy to tell from a solution (a random digit usually clashes with a
clue), the model's own confident mistakes are not, so a model trained only on uniform noise may trust
every plausible digit it reads and keep its first wrong guesses. The extra cost is one sort and one draw
per step; the first pass is already run. Measured, it did not help (README.md, "Tried: training on the
sampler's own canvases").

Deduction-order noise (`--ordered-fraction F` draws it for the fraction F of the canvases; 0.5 in the
shipped recipe, where it lifted the 28-35-clue band from 71% to 88% solved): the t * C corrupted cells
are not random but the last ones a solver using singles would fill (`singles.cell_rounds`: latest round
first, random within a round, cells singles never fill last of all), so the clean cells are the clues
and the early deductions. That is the canvas the sampler builds at serving time, where the confident
(easy) cells are accepted first and the hard ones stay noise, while uniform noise shows the model hard
cells clean as often as easy ones.

Run (the shipped recipe; see README.md):
    python -m recipes.sudoku.train --out recipes/sudoku/data/run --minutes 90
Resume after an interruption with `--out` (and `--init`, if given) plus `--resume`: the run's saved
settings are restored, and any option given beside them overrides them (`--minutes 120` to extend it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.loader import load_checkpoint
from engine.sampler import LMHead, sample_tokens, soft_embedding, token_entropy
from recipes.sudoku import tokens
from recipes.sudoku.checkpoint import init_checkpoint, save_checkpoint
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import (
    DATA_DIR,
    VALID_SEED,
    Batch,
    Pair,
    TrainSampler,
    banded_set,
    dug_pool,
    split_dug,
)
from recipes.sudoku.dense_forward import (
    DENSE,
    EAGER,
    LayerForwards,
    Passes,
    PromptCache,
    compiled_layer_forwards,
    head_logits,
    lm_head,
)
from recipes.sudoku.eval import adaptive, run_band
from recipes.sudoku.weight_average import WeightAverage


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    """Length of the step-based schedule; with `schedule="time"` only a safety cap, set well above the
    5,000 steps a 90-minute CPU run now reaches (4,000 nearly cut a faster-step run short)."""
    schedule: str = "time"
    """"steps": LR and curriculum follow step / steps (bitwise reproducible). "time": they follow
    elapsed / minutes, so the run always ends its schedule inside its time budget however busy the
    (shared) CPU is; the data and noise stay seeded, only the number of steps varies."""
    batch_size: int = 32
    """Canvases per step."""
    canvases_per_puzzle: int = 1
    """Canvases drawn (each at its own noise level) per puzzle of a step: `batch_size / this` puzzles,
    each prompt encoded once for all its canvases."""
    lr: float = 2e-3
    min_lr_ratio: float = 0.025
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    self_cond_prob: float = 0.5
    compile: bool = True
    """Run the training forward's layers through `torch.compile` (about 12% faster steps on CPU)."""
    ema: float = 0.998
    """Decay of an exponential moving average of the weights (`weight_average.py`), 0 for none. With
    one, every save also writes the averaged weights to `<out>-ema/`, and validation runs both."""
    own_canvas_from: float = 1.0
    """From this fraction of the schedule on, self-conditioned steps grade the model on the sampler-step
    canvas of its first pass (see above); 1, the shipped recipe, never."""
    short_chain_keep: float = 1.0
    """Probability of keeping an example that singles solve in at most `singles.SHORT_CHAIN` rounds
    (`TrainSampler`); 1, the shipped recipe, keeps all."""
    dug_fraction: float = 1.0
    """Fraction of examples at a clue count built as the evaluation sets are (the puzzle the generator's
    dig held at that count, `data.TrainSampler`); the rest reveal random cells of a minimal puzzle.
    1, the shipped recipe, all."""
    ordered_fraction: float = 0.5
    """Fraction of canvases corrupted in deduction order (see above); the rest uniformly."""
    min_clues: int = 24
    max_clues: int = 50
    start_min_clues: int = 44
    """Curriculum: the lowest clue count starts here and falls linearly to `min_clues`..."""
    curriculum: float = 0.4
    """...over this fraction of the schedule."""
    pool_size: int = 6000
    seed: int = 0
    minutes: float = 90.0
    """Wall-clock budget: training stops (and saves) once it is spent."""
    save_minutes: float = 4.0
    eval_every: int = 2000
    eval_size: int = 24
    """Validation puzzles per band (36-45 and 28-35) solved through the engine every `eval_every` steps."""


def corrupt(
    targets: Tensor,
    t: Tensor,
    vocab_size: int,
    generator: torch.Generator,
    order: Tensor | None = None,
    ordered_fraction: float = 0.0,
) -> Tensor:
    """Replace each token by a uniform random one with probability t (per example): (B, C) -> (B, C).
    With `order` (B, C), a row drawn with probability `ordered_fraction` replaces instead the round(t * C)
    tokens of the highest order (`ordered_hits`)."""
    noise = torch.randint(0, vocab_size, targets.shape, generator=generator)
    hit = torch.rand(targets.shape, generator=generator) < t[:, None]
    if order is not None and ordered_fraction > 0:
        rows = torch.rand(targets.shape[0], generator=generator) < ordered_fraction  # (B,)
        hit = torch.where(rows[:, None], ordered_hits(order, t, generator), hit)
    return torch.where(hit, noise, targets)


def ordered_hits(order: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
    """The round(t * C) positions of each row with the highest `order`, ties broken at random:
    (B, C) long, (B,) -> (B, C) bool."""
    key = order.float() + torch.rand(order.shape, generator=generator)  # random within one order value
    rank = key.argsort(dim=-1, descending=True).argsort(dim=-1)  # (B, C): 0 = highest order
    return rank < (t * order.shape[1]).round()[:, None]


def first_pass(
    model: DiffusionGemma,
    head: LMHead,
    cache: PromptCache,
    noisy: Tensor,
    t: Tensor,
    forwards: LayerForwards = EAGER,
    passes: Passes = DENSE,
    soft: Tensor | None = None,
) -> Tensor:
    """No-grad logits (B, C, V) divided by the sampler's temperature for noise level t (0.4 + 0.4 t);
    `soft`: a previous pass's soft embeddings to read (None: none, the recipe's first pass)."""
    with torch.no_grad():
        hidden = passes.decode(model, cache.detached(), noisy, soft, forwards)
        logits = head_logits(hidden, head)  # (B, C, V)
        return logits / (0.4 + 0.4 * t)[:, None, None]


def sampler_canvas(processed: Tensor, keep: Tensor, vocab_size: int, generator: torch.Generator) -> Tensor:
    """The canvas one sampler step builds: a draw from softmax(processed) at the `keep[b]` lowest-entropy
    positions of each row, uniform noise at the others. (B, C, V), (B,) -> (B, C)."""
    entropy, _ = token_entropy(processed)  # (B, C)
    sample = sample_tokens(processed.flatten(0, 1), generator).view(entropy.shape)  # (B, C)
    rank = entropy.argsort(dim=-1).argsort(dim=-1)  # (B, C): 0 = most confident
    noise = torch.randint(0, vocab_size, sample.shape, generator=generator)
    return torch.where(rank < keep[:, None], sample, noise)


def training_loss(
    model: DiffusionGemma,
    batch: Batch,
    generator: torch.Generator,
    use_self_cond: bool,
    own_canvas: bool = False,
    forwards: LayerForwards = EAGER,
    canvases_per_puzzle: int = 1,
    ordered_fraction: float = 0.0,
    passes: Passes = DENSE,
    self_cond_rounds: int = 1,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the denoiser on one corrupted batch, and accuracy figures for the log.

    Each puzzle's prompt is encoded once and read by `canvases_per_puzzle` canvases, each corrupted at
    its own noise level. With `use_self_cond` the graded pass gets the first pass's soft embeddings, and
    with `own_canvas` also its sampler-step canvas in place of the corrupted one. `ordered_fraction`
    of the canvases are corrupted in deduction order (needs `batch.order`). `passes` runs the prompt
    and canvas passes (the LoRA recipe's run each under its adapter side). `self_cond_rounds` no-grad
    passes build the graded pass's soft embeddings, each reading the one before (1: the first pass only).
    """
    head = lm_head(model)
    vocab_size = model.config.vocab_size
    targets = batch.targets.repeat_interleave(canvases_per_puzzle, dim=0)  # (B * R, C)
    t = torch.rand(targets.shape[0], generator=generator)
    if ordered_fraction > 0 and batch.order is None:
        raise ValueError("ordered_fraction > 0 needs a batch drawn with_order")
    order = None if batch.order is None else batch.order.repeat_interleave(canvases_per_puzzle, dim=0)
    noisy = corrupt(targets, t, vocab_size, generator, order, ordered_fraction)
    cache = passes.encode(model, batch.prompts, forwards)
    soft = None
    if use_self_cond:
        processed = first_pass(model, head, cache, noisy, t, forwards, passes)
        soft = soft_embedding(processed, head)
        for _ in range(self_cond_rounds - 1):
            processed = first_pass(model, head, cache, noisy, t, forwards, passes, soft)
            soft = soft_embedding(processed, head)
        if own_canvas:
            keep = ((1 - t) * noisy.shape[1]).round().long()
            noisy = sampler_canvas(processed, keep, vocab_size, generator)
    hidden = passes.decode(model, cache, noisy, soft, forwards)
    logits = head_logits(hidden, head)  # (B * R, C, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with torch.no_grad():
        correct = logits.argmax(-1) == targets  # (B * R, C)
        blank = (batch.prompts[:, 1:] == tokens.BLANK).repeat_interleave(canvases_per_puzzle, dim=0)
        metrics = {
            "loss": float(loss.detach()),
            "blank_acc": float(correct[:, :-1][blank].float().mean()),
            "grid_acc": float(correct.all(-1).float().mean()),
        }
    return loss, metrics


def lr_at(progress: float, step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine down to `min_lr_ratio * lr` at progress 1."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, progress)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def min_clues_at(progress: float, config: TrainConfig) -> int:
    """The curriculum's lowest clue count at `progress` in [0, 1] (easy puzzles first)."""
    fraction = min(1.0, progress / max(config.curriculum, 1e-9))
    return round(config.start_min_clues + (config.min_clues - config.start_min_clues) * fraction)


def validate(model: DiffusionGemma, checkpoint_dir: Path, sets: dict[str, list[Pair]]) -> dict[str, float]:
    """Solve rate and median steps per band through the engine's `generate` with the checkpoint defaults."""
    defaults = load_checkpoint(checkpoint_dir, with_tokenizer=False).defaults
    out: dict[str, float] = {}
    model.eval()
    for band, pairs in sets.items():
        result = run_band(model, defaults, pairs, adaptive, len(pairs))
        solved = result.solved_steps
        out[f"solve_{band}"] = result.solve_rate
        out[f"steps_{band}"] = statistics.median(solved) if solved else float("nan")
    model.train()
    return out


class Trainer:
    """Owns model, optimizer, data and RNG state; `run()` trains until the step or time budget ends."""

    def __init__(
        self, config: TrainConfig, init_dir: Path, out_dir: Path, state_path: Path, data_dir: Path = DATA_DIR
    ) -> None:
        self.config = config
        self.init_dir = init_dir
        self.out_dir = out_dir
        self.state_path = state_path
        if not (init_dir / "model.safetensors").is_file():
            init_checkpoint(init_dir, seed=config.seed)
        self.model = load_checkpoint(init_dir, with_tokenizer=False).model.train().requires_grad_(True)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.98),
        )
        if config.batch_size % config.canvases_per_puzzle:
            raise ValueError("batch_size must be a multiple of canvases_per_puzzle")
        self.forwards = compiled_layer_forwards() if config.compile else EAGER
        self.average = WeightAverage(self.model, config.ema) if config.ema > 0 else None
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed = 0.0
        """Seconds of training so far (carried across resumes; drives the "time" schedule)."""
        pool, dig_orders = split_dug(dug_pool(config.pool_size, data_dir=data_dir))
        self.sampler = TrainSampler(
            pool,
            self.rng,
            config.min_clues,
            config.max_clues,
            config.short_chain_keep,
            dig_orders=dig_orders,
            dug_fraction=config.dug_fraction,
        )
        self.valid = banded_set(config.eval_size, VALID_SEED, data_dir, bands=("36-45", "28-35"))

    @property
    def average_dir(self) -> Path:
        """Where the averaged weights go: `<out>-ema/` beside `<out>/`."""
        return self.out_dir.with_name(self.out_dir.name + "-ema")

    def save(self) -> None:
        save_checkpoint(self.model, self.init_dir, self.out_dir)
        if self.average is not None:
            with self.average.swapped_in(self.model):
                save_checkpoint(self.model, self.init_dir, self.average_dir)
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "python_rng": self.rng.getstate(),
            "torch_rng": self.generator.get_state(),
            "config": asdict(self.config),
            "average": None if self.average is None else self.average.state_dict(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def resume(self, state: dict[str, Any] | None = None) -> None:
        """Continue from the saved state: `state` if the caller has read it, else `state_path`'s."""
        if state is None:
            state = torch.load(self.state_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["python_rng"])
        self.generator.set_state(state["torch_rng"])
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])
        self.step = state["step"]
        self.elapsed = state["elapsed"]

    @property
    def progress(self) -> float:
        """How far through the schedule, 0..1."""
        if self.config.schedule == "time":
            return self.elapsed / (60 * self.config.minutes)
        return self.step / self.config.steps

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps or self.elapsed >= 60 * self.config.minutes

    def train_step(self) -> dict[str, float]:
        start = time.monotonic()
        lr = lr_at(self.progress, self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sampler.min_clues = min_clues_at(self.progress, self.config)
        puzzles = self.config.batch_size // self.config.canvases_per_puzzle
        batch = self.sampler.batch(puzzles, with_order=self.config.ordered_fraction > 0)
        self_cond = self.rng.random() < self.config.self_cond_prob
        own_canvas = self.progress >= self.config.own_canvas_from
        loss, metrics = training_loss(
            self.model,
            batch,
            self.generator,
            self_cond,
            own_canvas,
            self.forwards,
            self.config.canvases_per_puzzle,
            self.config.ordered_fraction,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model)
        self.step += 1
        self.elapsed += time.monotonic() - start
        return metrics | {
            "lr": lr,
            "grad_norm": float(grad_norm),
            "self_cond": float(self_cond),
            "min_clues": self.sampler.min_clues,
        }

    def validate(self) -> dict[str, float | str]:
        """Validation of the current weights, and of the averaged ones (keys `ema_*`) if kept."""
        row: dict[str, float | str] = {"step": self.step, "kind": "valid"}
        row |= validate(self.model, self.out_dir, self.valid)
        if self.average is not None:
            with self.average.swapped_in(self.model):
                averaged = validate(self.model, self.out_dir, self.valid)
            row |= {f"ema_{k}": v for k, v in averaged.items()}
        return row

    def run(self, log_path: Path) -> None:
        config = self.config
        last_save = time.monotonic()
        total = round(60 * config.minutes) if config.schedule == "time" else config.steps
        unit = "s" if config.schedule == "time" else "step"
        bar = tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=5)
        bar.update(round(self.elapsed) if config.schedule == "time" else self.step)
        window: list[dict[str, float]] = []
        with log_path.open("a") as log:
            while not self.done:
                before = self.elapsed
                window.append(self.train_step())
                bar.update(round(self.elapsed) - round(before) if config.schedule == "time" else 1)
                if self.step % 25 == 0:
                    row = mean_row(window) | {"step": self.step, "elapsed_s": round(self.elapsed, 1)}
                    window = []
                    bar.set_postfix(loss=f"{row['loss']:.3f}", blank=f"{row['blank_acc']:.3f}")
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if self.step % config.eval_every == 0:
                    self.save()
                    last_save = time.monotonic()
                    row = self.validate()
                    tqdm.write(json.dumps(row))
                    log.write(json.dumps(row) + "\n")
                elif time.monotonic() - last_save > 60 * config.save_minutes:
                    self.save()
                    last_save = time.monotonic()
        bar.close()
        self.save()


def mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """The column means of a window of log rows, rounded for the JSONL log; a column missing from some
    rows (the LoRA recipe's two kinds of step log different figures) is the mean of those that have it."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: round(statistics.fmean(r[k] for r in rows if k in r), 5) for k in keys}


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def add_config_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One `--field-name` option per config field, typed from its default and absent unless given."""
    for name, value in defaults.items():
        kind = _parse_bool if isinstance(value, bool) else type(value)
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"default: {value}")


def given_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The config fields the command line named (`add_config_options`), and only those."""
    return {name: getattr(args, name) for name in defaults if hasattr(args, name)}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line: paths and threads, and the `TrainConfig` fields it names (and only those)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR / "run", help="checkpoint directory to write")
    parser.add_argument("--init", type=Path, default=None, help="initial checkpoint (default: <out>-init)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>-state.pt with its saved settings; options given here override them",
    )
    add_threads_option(parser)
    defaults = asdict(TrainConfig())
    add_config_options(parser, defaults)
    args = parser.parse_args(argv)
    return args, given_options(args, defaults)


def run_config(given: dict[str, Any], saved: dict[str, Any] | None) -> TrainConfig:
    """The settings of a run: the command line's over the saved run's when resuming, else the recipe's."""
    base = TrainConfig() if saved is None else TrainConfig(**saved)
    return replace(base, **given)


def main(argv: list[str] | None = None) -> int:
    args, given = parse_args(argv)
    out: Path = args.out
    state_path = out.with_name(out.name + "-state.pt")
    resuming = args.resume and state_path.is_file()
    state: dict[str, Any] | None = torch.load(state_path, weights_only=False) if resuming else None
    config = run_config(given, None if state is None else state["config"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    init_dir = args.init or out.with_name(out.name + "-init")
    trainer = Trainer(config, init_dir, out, state_path)
    if state is not None:
        trainer.resume(state)
        changed = {k: v for k, v in given.items() if state["config"].get(k) != v}
        print(
            f"resumed at step {trainer.step}; changed from the saved run: {changed or 'nothing'}",
            file=sys.stderr,
        )
    out.mkdir(parents=True, exist_ok=True)
    trainer.run(out.with_name(out.name + "-log.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
