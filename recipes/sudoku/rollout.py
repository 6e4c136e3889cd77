"""On-policy chains: grade the denoiser on the canvases its own sampler builds at serving time.

The recipe's objective grades the model on canvases corrupted by a rule (uniform or deduction-order
noise), so it never sees the states where the hard puzzles fail at serving time: every unsolved one
runs all its steps re-noising, stuck on canvases full of its own accepted guesses and the
self-conditioning input of its own earlier passes. `Chains` keeps one such trajectory per batch row,
each on its own puzzle: a training step advances every chain by one sampler step (a no-grad pass, the
serving sampler's rules: the temperature schedule, entropy-bound acceptance, uniform re-noising, the
soft embedding) and the graded pass then reads the chain's new canvas and soft embedding, with the
clean solution as the target. A chain that meets the stop rule (or the step cap) starts over on a new
puzzle after the step, so the chains keep sampling the whole trajectory, and most of all its stuck
tail.

The one pass per step is the cost of a self-conditioned step's first pass; the chains stay on the
training generator and the sampler's RNG, so a run is seeded. The model moves a little between two
steps of one chain, as it would between two updates of an on-policy method; a resumed run starts its
chains over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import DiffusionDefaults
from engine.model.diffusion_gemma import DiffusionGemma
from engine.sampler import LMHead, accept_mask, place_noise, sample_tokens, soft_embedding, token_entropy
from recipes.sudoku.data import Batch, TrainSampler
from recipes.sudoku.dense_forward import DENSE, EAGER, LayerForwards, Passes, head_logits, lm_head


@dataclass(frozen=True)
class ChainRules:
    """The serving sampler's settings the chains follow (the base model's `generation_config.json`)."""

    max_steps: int = 48
    t_min: float = 0.8
    t_max: float = 1.2
    entropy_bound: float = 0.3
    confidence_threshold: float = 0.005

    @classmethod
    def of(cls, defaults: DiffusionDefaults) -> ChainRules:
        return cls(
            defaults.max_denoising_steps,
            defaults.t_min,
            defaults.t_max,
            defaults.entropy_bound,
            defaults.confidence_threshold,
        )

    def temperatures(self, steps: Tensor) -> Tensor:
        """The temperature before each row's step (`sampler.temperature`): (B,) long -> (B,) fp32."""
        remaining = (self.max_steps - steps).to(torch.int32)
        return self.t_min + (self.t_max - self.t_min) * (remaining / self.max_steps)


class Chains:
    """One sampler trajectory per row: its puzzle, canvas, soft embedding, steps done and last argmax."""

    def __init__(
        self,
        sampler: TrainSampler,
        size: int,
        rules: ChainRules,
        hidden_size: int,
        vocab_size: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`dtype`: the model's weight dtype, the soft embedding's."""
        self.sampler = sampler
        self.rules = rules
        self.vocab_size = vocab_size
        self.generator = generator
        self.puzzles = sampler.batch(size)
        canvas_length = self.puzzles.targets.shape[1]
        self.canvas = self._noise((size, canvas_length))  # (B, C)
        self.soft = torch.zeros(size, canvas_length, hidden_size, dtype=dtype)  # (B, C, H): zeros = none yet
        self.steps = torch.zeros(size, dtype=torch.long)  # (B,)
        self.last_argmax = torch.full((size, canvas_length), -1, dtype=torch.long)  # (B, C)

    def _noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(0, self.vocab_size, shape, generator=self.generator)

    def advance(self, hidden: Tensor, head: LMHead) -> Tensor:
        """One sampler step of every chain from the decoder's hidden states on its current canvas
        (B, C, H); returns which chains are done (B,) bool."""
        with torch.no_grad():
            temps = self.rules.temperatures(self.steps)  # (B,)
            processed = head_logits(hidden, head) / temps[:, None, None]  # (B, C, V)
            flat = processed.flatten(0, 1)  # (B * C, V)
            entropy = token_entropy(flat)[0].view(self.canvas.shape)  # (B, C)
            argmax = processed.argmax(dim=-1)  # (B, C)
            sample = sample_tokens(flat, self.generator).view(self.canvas.shape)  # (B, C)
            accepted = accept_mask(entropy, self.rules.entropy_bound)  # (B, C)
            free = torch.ones_like(accepted)
            self.canvas = place_noise(self.canvas, sample, accepted, free, self._noise(self.canvas.shape))
            self.soft = soft_embedding(flat, head).view(self.soft.shape)  # the weight dtype
        self.steps += 1
        stable = (argmax == self.last_argmax).all(dim=-1)
        confident = entropy.mean(dim=-1) < self.rules.confidence_threshold
        self.last_argmax = argmax
        return (stable & confident) | (self.steps >= self.rules.max_steps)

    def restart(self, done: Tensor) -> None:
        """Chains marked done (B,) bool start over on new puzzles from the sampler."""
        rows = done.nonzero().flatten()
        if rows.numel() == 0:
            return
        fresh = self.sampler.batch(rows.numel())
        self.puzzles = Batch(
            prompts=self.puzzles.prompts.index_copy(0, rows, fresh.prompts),
            targets=self.puzzles.targets.index_copy(0, rows, fresh.targets),
            num_clues=self.puzzles.num_clues.index_copy(0, rows, fresh.num_clues),
        )
        self.canvas[rows] = self._noise((rows.numel(), self.canvas.shape[1]))
        self.soft[rows] = 0.0
        self.steps[rows] = 0
        self.last_argmax[rows] = -1


def chains_loss(
    model: DiffusionGemma,
    chains: Chains,
    forwards: LayerForwards = EAGER,
    passes: Passes = DENSE,
) -> tuple[Tensor, dict[str, float]]:
    """Advance every chain one sampler step, then the cross-entropy of the graded pass on the chains'
    new canvases and soft embeddings against their solutions; done chains restart after it."""
    puzzles, head = chains.puzzles, lm_head(model)
    cache = passes.encode(model, puzzles.prompts, forwards)
    with torch.no_grad():
        hidden = passes.decode(model, cache.detached(), chains.canvas, chains.soft, forwards)
    done = chains.advance(hidden, head)
    logits = head_logits(passes.decode(model, cache, chains.canvas, chains.soft, forwards), head)
    loss = F.cross_entropy(logits.flatten(0, 1), puzzles.targets.flatten())
    with torch.no_grad():
        correct = logits.argmax(-1) == puzzles.targets  # (B, C)
        metrics = {
            "loss": float(loss.detach()),
            "grid_acc": float(correct.all(-1).float().mean()),
            "chain_steps": float(chains.steps.float().mean()),
            "chain_done": float(done.float().mean()),
        }
    chains.restart(done)
    return loss, metrics
