"""Train the `sudoku-hard` LoRA adapter on the shipped model (frozen) for the hardest puzzles.

The recipe's objective and step (`train.training_loss`: uniform-state diffusion, half the canvases
corrupted in deduction order, self-conditioning on half the steps) on the recipe's pool, with the clue
counts drawn mostly from the hard band (`lora_data.BandMixSampler`), through the dense training forward
with LoRA deltas on the target projections (`lora_adapter.Adapter`: encoder-side deltas in the causal
prompt pass, decoder-side ones in the denoise pass, as transformers + PEFT run the adapter). Only the
deltas train; the base weights stay exactly the shipped ones. Wall-clock schedule as `train.py`'s: the
learning rate follows elapsed training time over `--minutes`.

    python -m recipes.sudoku.lora --minutes 60 --threads 1     # writes models/sudoku-hard/

The adapter is saved every `--save-minutes` and at the end; `--resume` continues from
`<data>/<out name>-state.pt`. The log (JSONL, 25-step means) is `<data>/<out name>-log.jsonl`. With
`--eval-minutes M` the deltas are served on `--eval-size` validation puzzles of the hard band (seed 3,
`lora_validate.py`) every M minutes of training and at the end, the latest go to `<out>-last/`, and
`<out>` keeps the best validated ones (solve rate, then median steps). Validation time is not training
time: the schedule follows the training steps' clock.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.model.loader import load_checkpoint
from recipes.sudoku import MODEL_DIR, REPO_ROOT
from recipes.sudoku.cli import add_threads_option
from recipes.sudoku.data import DATA_DIR, dug_pool, split_dug
from recipes.sudoku.dense_forward import EAGER, compiled_layer_forwards
from recipes.sudoku.lora_adapter import Adapter, LoRASpec
from recipes.sudoku.lora_data import BandMixSampler, ClueBand
from recipes.sudoku.lora_validate import AdapterValidator, Validation
from recipes.sudoku.rollout import ChainRules, Chains, chains_loss
from recipes.sudoku.train import (
    TrainConfig,
    add_config_options,
    given_options,
    lr_at,
    mean_row,
    training_loss,
)

ADAPTER_DIR = REPO_ROOT / "models" / "sudoku-hard"
DTYPES = ("float32", "bfloat16")
"""The base's dtypes a run can train through (`LoRATrainConfig.dtype`)."""


@dataclass(frozen=True)
class LoRATrainConfig:
    rank: int = 32
    alpha: float = 32.0
    use_rslora: bool = True
    attention: bool = True
    mlp: bool = True
    self_conditioning: bool = True
    experts: bool = False
    """LoRA on the MoE experts too (PEFT's `target_parameters`)."""
    lr: float = 7e-4
    min_lr_ratio: float = 0.025
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = 32
    self_cond_prob: float = 0.5
    ordered_fraction: float = 0.5
    own_canvas: bool = False
    """On self-conditioned steps the graded pass reads the canvas one sampler step builds from the first
    pass (its own confident guesses, mistakes included) instead of the corrupted one (`train.py`'s
    `--own-canvas-from`)."""
    self_cond_rounds: int = 1
    """On self-conditioned steps, the no-grad passes that build the graded pass's soft embeddings, drawn
    from 1..this per step; each reads the one before, so the graded pass meets beliefs already refined,
    as the serving sampler's later steps feed it (training otherwise only shows it a pass that read none).
    1, the recipe's first pass alone."""
    rollout_fraction: float = 0.0
    """Share of the steps graded on on-policy chains (`rollout.py`: the canvases and soft embeddings the
    serving sampler builds from the model's own passes) instead of on corrupted canvases..."""
    rollout_from: float = 0.0
    """...from this fraction of the schedule on (before it, the run draws exactly what it would draw
    without chains; the chains start there)."""
    dug_fraction: float = 1.0
    hard_fraction: float = 0.8
    """Share of examples at `hard_low`-`hard_high` clues; the rest at `easy_low`-`easy_high`."""
    hard_low: int = 22
    hard_high: int = 27
    easy_low: int = 28
    easy_high: int = 45
    compile: bool = True
    dtype: str = "float32"
    """The frozen base's weights and the forward's activations: `float32`, or `bfloat16` (the matmuls on
    the CPU's bf16 units; the deltas and the optimizer stay fp32, the logits and loss are fp32)."""
    pool_size: int = 6000
    seed: int = 0
    minutes: float = 60.0
    steps: int = 20000
    """A safety cap on steps; the schedule follows the wall clock."""
    save_minutes: float = 4.0
    eval_minutes: float = 0.0
    """Validate every this many minutes of training (and at the end), keeping the best adapter in the
    output directory; 0 keeps the last one and validates nothing."""
    eval_size: int = 80
    """Validation puzzles (seed 3) in the hard band."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.self_cond_rounds < 1:
            raise ValueError(f"self_cond_rounds {self.self_cond_rounds}: at least 1 (the first pass)")

    def spec(self) -> LoRASpec:
        return LoRASpec(
            self.rank,
            self.alpha,
            self.use_rslora,
            self.attention,
            self.mlp,
            self.self_conditioning,
            self.experts,
        )

    def schedule(self) -> TrainConfig:
        """The learning-rate fields `train.lr_at` reads."""
        return TrainConfig(lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup=self.warmup)

    def bands(self) -> list[ClueBand]:
        return [
            ClueBand(self.hard_fraction, self.hard_low, self.hard_high),
            ClueBand(1 - self.hard_fraction, self.easy_low, self.easy_high),
        ]


class LoRATrainer:
    """Owns the frozen base, the adapter, optimizer, data and RNG state; `run()` trains to the budget."""

    def __init__(
        self,
        config: LoRATrainConfig,
        base_dir: Path,
        out_dir: Path,
        state_path: Path,
        data_dir: Path = DATA_DIR,
    ) -> None:
        self.config = config
        self.base_dir = base_dir
        self.out_dir = out_dir
        self.state_path = state_path
        base = load_checkpoint(base_dir, dtype=getattr(torch, config.dtype), with_tokenizer=False)
        self.model = base.model.train()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.adapter = Adapter.attach(self.model, config.spec(), self.generator)
        self.passes = self.adapter.passes()
        self.optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
        )
        self.forwards = compiled_layer_forwards() if config.compile else EAGER
        self.rng = random.Random(config.seed)
        pool, dig_orders = split_dug(dug_pool(config.pool_size, data_dir=data_dir))
        self.sampler = BandMixSampler(pool, self.rng, config.bands(), dig_orders, config.dug_fraction)
        self.chain_rules = ChainRules.of(base.defaults)
        self.chains: Chains | None = None
        """Started at the first chain step (`rollout_from`), so the data before it is the plain run's."""
        self.step = 0
        self.elapsed = 0.0
        self.validator = (
            AdapterValidator(base_dir, f"{config.hard_low}-{config.hard_high}", config.eval_size, data_dir)
            if config.eval_minutes > 0
            else None
        )
        self.best: Validation | None = None
        self.validated_at = 0.0

    @property
    def progress(self) -> float:
        return self.elapsed / (60 * self.config.minutes)

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps or self.elapsed >= 60 * self.config.minutes

    def train_step(self) -> dict[str, float]:
        start = time.monotonic()
        lr = lr_at(self.progress, self.step, self.config.schedule())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.chain_step_due():
            loss, metrics = chains_loss(self.model, self.started_chains(), self.forwards, self.passes)
            metrics |= {"chain": 1.0}
        else:
            loss, metrics = self.corrupted_loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.config.clip)
        self.optimizer.step()
        self.step += 1
        self.elapsed += time.monotonic() - start
        return metrics | {"lr": lr, "grad_norm": float(grad_norm)}

    def chain_step_due(self) -> bool:
        """Whether this step grades on the chains: from `rollout_from` on, with `rollout_fraction`."""
        rollout = self.config.rollout_fraction > 0 and self.progress >= self.config.rollout_from
        return rollout and self.rng.random() < self.config.rollout_fraction

    def started_chains(self) -> Chains:
        if self.chains is None:
            config = self.model.config
            self.chains = Chains(
                self.sampler,
                self.config.batch_size,
                self.chain_rules,
                config.hidden_size,
                config.vocab_size,
                self.generator,
                self.model.embed_tokens.weight.dtype,
            )
        return self.chains

    def corrupted_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The recipe's objective on a fresh batch of corrupted canvases (`train.training_loss`)."""
        batch = self.sampler.batch(self.config.batch_size, with_order=self.config.ordered_fraction > 0)
        self_cond = self.rng.random() < self.config.self_cond_prob
        rounds = self.self_cond_rounds() if self_cond else 1
        loss, metrics = training_loss(
            self.model,
            batch,
            self.generator,
            self_cond,
            own_canvas=self_cond and self.config.own_canvas,
            forwards=self.forwards,
            ordered_fraction=self.config.ordered_fraction,
            passes=self.passes,
            self_cond_rounds=rounds,
        )
        hard = batch.num_clues <= self.config.hard_high
        return loss, metrics | {"hard": float(hard.float().mean())}

    def self_cond_rounds(self) -> int:
        """1..`self_cond_rounds`, uniformly (no draw at 1, so such runs keep the earlier runs' stream)."""
        if self.config.self_cond_rounds == 1:
            return 1
        return self.rng.randint(1, self.config.self_cond_rounds)

    @property
    def last_dir(self) -> Path:
        """Where the latest deltas go: the output itself unless validation keeps the best there."""
        return self.out_dir if self.validator is None else self.out_dir.with_name(self.out_dir.name + "-last")

    def save(self) -> None:
        self.adapter.save(self.last_dir, _base_name(self.base_dir))
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "best": None if self.best is None else asdict(self.best),
            "validated_at": self.validated_at,
            "adapter": self.adapter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "python_rng": self.rng.getstate(),
            "torch_rng": self.generator.get_state(),
            "config": asdict(self.config),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def resume(self, state: dict[str, Any]) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["python_rng"])
        self.generator.set_state(state["torch_rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.best = Validation(**state["best"]) if state.get("best") else None
        self.validated_at = state.get("validated_at", 0.0)

    def validate(self) -> dict[str, object]:
        """Serve the deltas last saved (`save`, to `last_dir`) on the validation set; the best so far is
        copied to the output. `run` saves right before each validation."""
        assert self.validator is not None
        self.validated_at = self.elapsed
        result = self.validator.validate(self.last_dir)
        kept = result.better(self.best)
        if kept:
            self.best = result
            self.adapter.save(self.out_dir, _base_name(self.base_dir))
        steps = result.median_steps if result.solved > 0 else None  # JSON has no infinity
        return {
            "kind": "valid",
            "step": self.step,
            "elapsed_s": round(self.elapsed, 1),
            "solved": result.solved,
            "median_steps": steps,
            "kept": kept,
        }

    def validation_due(self) -> bool:
        every = 60 * self.config.eval_minutes
        return self.validator is not None and self.elapsed - self.validated_at >= every

    def run(self, log_path: Path) -> None:
        last_save = time.monotonic()
        window: list[dict[str, float]] = []
        with log_path.open("a") as log:
            while not self.done:
                window.append(self.train_step())
                if self.step % 25 == 0:
                    row = mean_row(window) | {"step": self.step, "elapsed_s": round(self.elapsed, 1)}
                    window = []
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if time.monotonic() - last_save > 60 * self.config.save_minutes:
                    self.save()
                    last_save = time.monotonic()
                if self.validation_due():
                    self.save()
                    log.write(json.dumps(self.validate()) + "\n")
                    log.flush()
            self.save()
            if self.validator is not None and self.validated_at < self.elapsed:
                log.write(json.dumps(self.validate()) + "\n")


def _base_name(base_dir: Path) -> str:
    """The base as the adapter names it: its path relative to the repository when inside it."""
    resolved = base_dir.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Paths and threads, and the `LoRATrainConfig` fields the command line names (only those)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=MODEL_DIR, help="the frozen base checkpoint")
    parser.add_argument("--out", type=Path, default=ADAPTER_DIR, help="adapter directory to write")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="pool cache, state and log directory")
    parser.add_argument("--resume", action="store_true", help="continue from the saved state")
    add_threads_option(parser)
    defaults = asdict(LoRATrainConfig())
    add_config_options(parser, defaults)
    args = parser.parse_args(argv)
    return args, given_options(args, defaults)


def main(argv: list[str] | None = None) -> int:
    args, given = parse_args(argv)
    data: Path = args.data
    data.mkdir(parents=True, exist_ok=True)
    state_path = data / f"{args.out.name}-state.pt"
    state = torch.load(state_path, weights_only=False) if args.resume and state_path.is_file() else None
    config = replace(LoRATrainConfig(**state["config"]) if state else LoRATrainConfig(), **given)
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    trainer = LoRATrainer(config, args.base, args.out, state_path, data)
    if state is not None:
        trainer.resume(state)
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    trainer.run(data / f"{args.out.name}-log.jsonl")
    print(f"{trainer.step} steps in {trainer.elapsed / 60:.1f} minutes of training; adapter in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
