"""`denoise_step` for small-vocabulary canvases on the CPU: every canvas's row-wise work in one pass.

`engine.sampler.denoise_step` steps canvases one at a time: about sixty small torch ops each, which on
the CPU cost their dispatch, not their arithmetic, when the vocabulary is small (the Sudoku model's
32 tokens: 9 ms of a 67 ms 16-canvas step, bench/RESULTS.md). Here the canvases of one step are packed
as rows of one [N * C, V] tensor, and every op that works row by row (soft-cap, temperature, entropy,
argmax, the inverse-CDF sample, the soft embedding's softmax, acceptance, re-noising, the stop rule)
runs once for all of them. The result is bit-identical to stepping each canvas alone
(tests/engine/test_packed_sampler.py):
- per canvas, as before: the two matmuls (LM head, soft embedding), so their rounding cannot depend on
  how many canvases share the step; the random draws, each canvas from its own generator in its own
  order (the sample's uniforms, then the re-noising tokens); the argmax history;
- per row, packed: everything else. Row-wise reductions do not depend on how many rows there are
  (the tiled sampler relies on the same), per-canvas parameters become [N, 1] columns in the dtype
  the scalar comparison rounds them to.

Used when the step's fp32 logits fit `PACKED_BYTES`; larger vocabularies keep the tiled path, whose
passes over a canvas already cost their arithmetic.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from engine.kernels.dispatch import use_kernels
from engine.lm_head import LMHead, tempered_logits
from engine.sampler import (
    CanvasState,
    StepParams,
    StepResult,
    accept_mask,
    apply_pins,
    denoise_step,
    place_noise,
    push_history,
    sample_tokens_from_uniforms,
    temperature,
    token_entropy,
)

PACKED_BYTES = 1 << 22
"""Largest [N * C, V] fp32 logits a packed step holds at once (4 MiB; a 16-canvas Sudoku step: 168 KiB)."""


def can_pack(hidden: Tensor, head: LMHead, num_canvases: int) -> bool:
    """True when the step runs on the CPU with at least two canvases whose logits fit `PACKED_BYTES`."""
    small = hidden.shape[0] * head.vocab_size * 4 <= PACKED_BYTES
    return num_canvases >= 2 and small and not use_kernels(hidden.device)


def step_canvases(
    hidden: Tensor, head: LMHead, states: list[CanvasState], params: list[StepParams]
) -> list[StepResult]:
    """The runner's sampler step: packed where `can_pack`, else `engine.sampler.denoise_step`."""
    step = packed_denoise_step if can_pack(hidden, head, len(states)) else denoise_step
    return step(hidden, head, states, params)


def packed_denoise_step(
    hidden: Tensor, head: LMHead, states: list[CanvasState], params: list[StepParams]
) -> list[StepResult]:
    """`engine.sampler.denoise_step` for N canvases packed as rows: hidden [N * C, H], same results."""
    n = len(states)
    assert n == len(params) and n > 0 and hidden.shape[0] % n == 0
    for state, p in zip(states, params, strict=True):
        assert state.step < p.max_steps, "a finished canvas must not be stepped again"
        assert state.history.shape[0] == p.stability_threshold, "history rows != stability_threshold"
    c = hidden.shape[0] // n
    with torch.no_grad():
        temps = _temperatures(states, params, hidden.device)  # [N]
        entropy, confidence, argmax, sample = _packed_stats(hidden, head, temps, states, c)  # [N, C] x 4
        tokens = torch.stack([s.tokens for s in states])  # [N, C]
        pinned = _packed_pins(states, c)
        if pinned is not None:
            entropy, argmax, confidence = apply_pins(pinned, tokens, entropy, argmax, confidence)
        free = torch.ones_like(tokens, dtype=torch.bool) if pinned is None else ~pinned  # [N, C]
        accepted = accept_mask(entropy, _column([p.entropy_bound for p in params], entropy))  # [N, C]
        next_tokens = _renoise_rows(tokens, sample, accepted, free, head.vocab_size, states)  # [N, C]
        stable = _push_histories(states, argmax)  # [N]
        mean_entropy = _mean_entropy_rows(entropy, states, free)  # [N]
        thresholds = _column([p.confidence_threshold for p in params], entropy).squeeze(1)  # [N]
        stop = stable & (mean_entropy < thresholds)  # [N]
        num_accepted = (accepted & free).sum(dim=-1)  # [N]
        scalars = torch.stack([num_accepted.float(), mean_entropy.float(), stop.float()], dim=1).tolist()
        confidence16 = confidence.to(torch.float16)
    per_canvas = (next_tokens.unbind(), argmax.unbind(), accepted.unbind(), confidence16.unbind(), scalars)
    rows = zip(*per_canvas, strict=True)
    return [_finish(state, p, *row) for state, p, row in zip(states, params, rows, strict=True)]


def _finish(
    state: CanvasState,
    params: StepParams,
    tokens: Tensor,
    argmax: Tensor,
    accepted: Tensor,
    confidence: Tensor,
    scalars: list[float],
) -> StepResult:
    """Store one canvas's step in its state (the self-conditioning input is stored by `_packed_stats`)."""
    state.tokens, state.argmax, state.accepted = tokens, argmax, accepted
    state.step += 1
    num_accepted, mean_entropy, stop = scalars
    finished = bool(stop) or state.step >= params.max_steps
    return StepResult(argmax, int(num_accepted), mean_entropy, confidence, finished, state.step)


@functools.lru_cache(maxsize=4096)
def _temperature(step: int, max_steps: int, t_min: float, t_max: float, device: torch.device) -> Tensor:
    """`engine.sampler.temperature`, computed once per distinct schedule point (never written to)."""
    return temperature(step, max_steps, t_min, t_max, device)


def _temperatures(states: list[CanvasState], params: list[StepParams], device: torch.device) -> Tensor:
    """[N] fp32: each canvas's temperature for its next step."""
    points = [(s.step, p.max_steps, p.t_min, p.t_max) for s, p in zip(states, params, strict=True)]
    return torch.stack([_temperature(*point, device) for point in points])


def _column(values: list[float], like: Tensor) -> Tensor:
    """Per-canvas scalars as an [N, 1] column in `like`'s dtype: what comparing with a Python float
    rounds the float to."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _packed_stats(
    hidden: Tensor, head: LMHead, temps: Tensor, states: list[CanvasState], c: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(entropy, confidence, argmax, sample), each [N, C], of `_tiled_canvas_stats` for every canvas;
    stores each canvas's soft embedding in its state."""
    tiles = torch.split(hidden, c)  # N x [C, H]
    raw = torch.cat([head.project(tile) for tile in tiles])  # [N * C, V] weight dtype
    processed = tempered_logits(raw, head, temps.repeat_interleave(c)[:, None])  # [N * C, V] fp32
    entropy, confidence = token_entropy(processed)
    argmax = processed.max(dim=-1).indices  # [N * C]
    uniforms = torch.cat([torch.rand((c, 1), generator=s.generator, device=raw.device) for s in states])
    sample = sample_tokens_from_uniforms(processed, uniforms)  # [N * C]
    probs = processed.to(raw.dtype).softmax(dim=-1, dtype=torch.float32).to(raw.dtype)  # [N * C, V]
    embedded = torch.cat([torch.matmul(rows, head.weight) for rows in torch.split(probs, c)])  # [N * C, H]
    self_cond = embedded * head.embed_scale.to(raw.dtype)
    for state, rows in zip(states, torch.split(self_cond, c), strict=True):
        state.self_cond = rows  # [C, H]
    n = len(states)
    return entropy.view(n, c), confidence.view(n, c), argmax.view(n, c), sample.view(n, c)


def _packed_pins(states: list[CanvasState], c: int) -> Tensor | None:
    """[N, C] bool: each canvas's pinned positions (a row of False for a canvas without pins); None when
    no canvas has any."""
    if all(s.pinned is None for s in states):
        return None
    none = torch.zeros(c, dtype=torch.bool, device=states[0].tokens.device)
    return torch.stack([none if s.pinned is None else s.pinned for s in states])


def _renoise_rows(
    tokens: Tensor, sample: Tensor, accepted: Tensor, free: Tensor, vocab_size: int, states: list[CanvasState]
) -> Tensor:
    """`engine.sampler.renoise` row by row, each canvas's noise drawn from its own generator: [N, C]."""
    size, device = (tokens.shape[1],), tokens.device
    noise = [torch.randint(0, vocab_size, size, generator=s.generator, device=device) for s in states]
    return place_noise(tokens, sample, accepted, free, torch.stack(noise))


def _push_histories(states: list[CanvasState], argmax: Tensor) -> Tensor:
    """[N] bool: each canvas's argmax [C] equals every row of its history (True without one); then push it
    (oldest row out). Canvases of one history depth, the usual case, are compared and pushed together."""
    depths = {s.history.shape[0] for s in states}
    if depths == {0}:
        return torch.ones(len(states), dtype=torch.bool, device=argmax.device)
    if len(depths) > 1:
        return torch.stack([push_history(s, row) for s, row in zip(states, argmax, strict=True)])
    history = torch.stack([s.history for s in states])  # [N, k, C]
    stable = (history == argmax[:, None, :]).flatten(1).all(dim=-1)  # [N]
    pushed = torch.cat([history[:, 1:], argmax[:, None, :]], dim=1)  # [N, k, C]
    for state, rows in zip(states, pushed.unbind(), strict=True):
        state.history = rows
    return stable


def _mean_entropy_rows(entropy: Tensor, states: list[CanvasState], free: Tensor) -> Tensor:
    """`engine.sampler.mean_entropy` row by row: [N, C] -> [N]; the plain mean for canvases without pins
    (as the one-canvas step takes it), the mean over free positions for the others."""
    plain = entropy.mean(dim=-1)
    if all(s.pinned is None for s in states):
        return plain
    over_free = (entropy * free).sum(dim=-1) / free.sum(dim=-1).clamp(min=1)
    has_pins = torch.tensor([s.pinned is not None for s in states], device=entropy.device)
    return torch.where(has_pins, over_free, plain)
