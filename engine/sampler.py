"""Entropy-bound sampler: temperature, acceptance, renoise, stop rule, self-conditioning.

Pure tensor functions that reproduce transformers' DiffusionGemma reference
(`LinearTemperatureScheduleLogitsProcessor`, `EntropyBoundSampler`, `StableAndConfidentStoppingCriteria`,
`DiffusionGemmaGenerationMixin._denoising_step` and the soft embeddings of
`DiffusionGemmaDecoderModel.forward`), batched over many canvases that each carry their own parameters
and their own `torch.Generator`.

Memory is bounded: `denoise_step` takes the decoder's final-normed hidden states, not logits, and runs the
tied LM head one canvas at a time, so only a few `[C, V]` fp32 temporaries are alive at once however many
canvases are batched. Everything a canvas keeps between steps is `[C]`, `[k, C]` or `[C, H]`.

Per canvas and step (the reference's order):

1. processed = softcap(hidden @ W.T in fp32) / T(step)
2. entropy = Categorical(logits=processed).entropy(); argmax = processed.argmax()
3. sample ~ softmax(processed) with the canvas's generator (one uniform per position; `sample_tokens`)
4. accept the lowest-entropy prefix whose entropy sum minus its maximum is <= entropy_bound
5. next tokens: accepted positions take the sample, every other position fresh uniform noise
6. stop when (argmax equals each of the last k argmaxes and mean entropy < confidence_threshold),
   or when max_steps steps are done
7. self_cond = softmax(processed in the embedding dtype) @ W * embed_scale, for the next decoder pass

Infilling: positions pinned by `SamplingParams.pinned_canvas` count as entropy 0 for acceptance (they
use none of the entropy budget), are never re-noised, show their pinned token in `argmax` (confidence 1),
and are left out of the stop rule's mean entropy. Their soft embedding is still the model's prediction,
exactly as the reference computes it for any canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernels.dispatch import use_kernels
from engine.lm_head import LMHead as LMHead  # re-exported: the sampler's head
from engine.lm_head import logits_for as logits_for
from engine.lm_head import softcap as softcap
from engine.lm_head import tempered_logits
from engine.request import FREE
from engine.request import StepParams as StepParams  # re-exported: the sampler's parameter type


@dataclass
class CanvasState:
    """One request's canvas between denoise steps; `denoise_step` updates it in place.

    Invariants: `tokens` holds the pinned value at every pinned position; `history` has
    `stability_threshold` rows (oldest first) and starts at -1; `self_cond` is None only before the first
    step; all tensors live on the generator's device.
    """

    tokens: Tensor
    """[C] long: the (noisy) canvas fed to the next decoder pass."""
    pinned: Tensor | None
    """[C] bool, or None when nothing is pinned."""
    history: Tensor
    """[k, C] long: argmax canvases of the last k steps."""
    self_cond: Tensor | None
    """[C, H] model dtype: soft embedding for the next decoder pass."""
    argmax: Tensor
    """[C] long: the latest argmax canvas, what gets committed."""
    step: int
    """Denoise steps done."""
    generator: torch.Generator
    accepted: Tensor | None = None
    """[C] bool: the positions that took the sample in the last step (None before the first)."""


@dataclass(frozen=True)
class StepResult:
    """What one denoise step says about one canvas (tensors stay on the device)."""

    argmax: Tensor
    """[C] long."""
    num_accepted: int
    """Free (unpinned) positions that took the sample this step."""
    mean_entropy: float
    """Mean entropy of softmax(processed) over free positions (0 if all are pinned)."""
    confidence: Tensor
    """[C] float16: probability of the argmax token (1 at pinned positions), for live display."""
    finished: bool
    """Stable and confident, or `max_steps` steps done."""
    step: int
    """Denoise steps done on this canvas, this one included."""


def temperature(step: int, max_steps: int, t_min: float, t_max: float, device: torch.device) -> Tensor:
    """The schedule's temperature before step `step` (0-based steps done), as a 0-d fp32 tensor on `device`.

    The reference counts steps remaining, n = max_steps - step, and computes
    t_min + (t_max - t_min) * n / max_steps in fp32 on the canvas's device with an int32 `n`; we repeat
    those ops on `device` so the quotient is bit-identical there (CUDA and CPU round n / max_steps
    differently). Example: max_steps 4, t 0.4..0.8 -> steps 0..3 give 0.8, 0.7, 0.6, 0.5.
    """
    remaining = torch.full((), max_steps - step, dtype=torch.int32, device=device)
    return t_min + (t_max - t_min) * (remaining / max_steps)


def token_entropy(processed: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy and max probability of softmax(processed): [C, V] fp32 -> ([C], [C]).

    Computed as `torch.distributions.Categorical(logits=processed).entropy()` does, so acceptance matches
    the reference bit for bit. The max probability is that of the argmax token (softmax is monotone).
    """
    logp = processed - processed.logsumexp(dim=-1, keepdim=True)  # [C, V]
    probs = logp.softmax(dim=-1)  # [C, V]
    confidence = probs.amax(dim=-1)  # [C]
    entropy = -logp.clamp_(min=torch.finfo(logp.dtype).min).mul_(probs).sum(-1)  # [C]
    return entropy, confidence


def sample_tokens(processed: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row from softmax(processed): [C, V] fp32 -> [C] long.

    Inverse-CDF sampling: one uniform per row from `generator`, located in the row's cumulative
    probabilities (a zero-probability token has an empty interval and is never drawn). The draw
    order is fixed, so a canvas's tokens do not depend on what it is batched with. `torch.multinomial`
    and an exponential race both draw a [C, V] tensor of noise instead, which profiled at 13-16% of a
    16-canvas engine step on the CPU.
    """
    uniform = torch.rand((processed.shape[0], 1), generator=generator, device=processed.device)  # [C, 1]
    return sample_tokens_from_uniforms(processed, uniform)


def sample_tokens_from_uniforms(processed: Tensor, uniform: Tensor) -> Tensor:
    """`sample_tokens` with its uniforms given: processed [R, V] fp32, uniform [R, 1] -> [R] long."""
    cdf = processed.softmax(dim=-1, dtype=torch.float32).cumsum_(dim=-1)  # [R, V]
    picks = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # [R, 1]
    return picks.squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def accept_mask(entropy: Tensor, entropy_bound: float | Tensor) -> Tensor:
    """Accept the k lowest-entropy positions with sum - max of their entropies <= bound: [C] -> [C] bool.

    Row by row on [N, C] with bounds [N, 1] in entropy's dtype (what a Python float bound rounds to).

    At least one position is always accepted. Example: bound 0.1, entropies [0.2, 0.05, 0.04, 0.3] ->
    sorted [0.04, 0.05, 0.2, 0.3], sums before each [0, 0.04, 0.09, 0.29] -> positions {0, 1, 2}.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)  # [C], [C]
    keep = sorted_entropy.cumsum(dim=-1) - sorted_entropy <= entropy_bound  # [C]
    return torch.zeros_like(keep).scatter(-1, order, keep)


def renoise(
    tokens: Tensor,
    sample: Tensor,
    accepted: Tensor,
    pinned: Tensor | None,
    vocab_size: int,
    generator: torch.Generator,
) -> Tensor:
    """The next canvas: accepted free positions take `sample`, other free ones uniform noise over the vocab.

    Pinned positions keep `tokens`. The noise is drawn for all C positions (a fixed draw order).
    Shapes: all [C]; `accepted` and `pinned` bool.
    """
    noise = torch.randint(0, vocab_size, tokens.shape, generator=generator, device=tokens.device)  # [C]
    free = torch.ones_like(accepted) if pinned is None else ~pinned  # [C]
    return place_noise(tokens, sample, accepted, free, noise)


def place_noise(tokens: Tensor, sample: Tensor, accepted: Tensor, free: Tensor, noise: Tensor) -> Tensor:
    """`renoise` with its noise drawn: accepted free positions take `sample`, other free ones `noise`,
    the rest keep `tokens`. Any shape, all alike."""
    next_tokens = torch.where(accepted & free, sample, tokens)
    return torch.where(~accepted & free, noise, next_tokens)


def soft_embedding(processed: Tensor, head: LMHead) -> Tensor:
    """Self-conditioning input for the next pass: [C, V] fp32 -> [C, H] in the weight dtype.

    The reference stores `processed.to(embedding dtype)` as self-conditioning logits and the decoder
    embeds them as softmax(logits, fp32).to(dtype) @ W * embed_scale.
    """
    dtype = head.weight.dtype
    probs = processed.to(dtype).softmax(dim=-1, dtype=torch.float32).to(dtype)  # [C, V]
    return torch.matmul(probs, head.weight) * head.embed_scale.to(dtype)  # [C, H]


def init_canvas(
    canvas_length: int,
    vocab_size: int,
    stability_threshold: int,
    generator: torch.Generator,
    pinned_canvas: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> CanvasState:
    """A fresh canvas: uniform tokens over the full vocab from `generator`, pinned positions set.

    `pinned_canvas` has one entry per position, a token id or `FREE` (checked by
    `SamplingParams.check_canvas`). `device` defaults to the generator's.
    """
    device = generator.device if device is None else device
    tokens = torch.randint(0, vocab_size, (canvas_length,), generator=generator, device=device)  # [C]
    pinned = None
    if pinned_canvas is not None and any(t != FREE for t in pinned_canvas):
        assert len(pinned_canvas) == canvas_length, "pinned_canvas must have one entry per position"
        values = torch.tensor(pinned_canvas, dtype=torch.long, device=device)  # [C]
        pinned = values != FREE
        tokens = torch.where(pinned, values, tokens)
    history = torch.full((stability_threshold, canvas_length), -1, dtype=torch.long, device=device)  # [k, C]
    return CanvasState(tokens, pinned, history, None, tokens.clone(), 0, generator)


def denoise_step(
    hidden: Tensor, head: LMHead, states: list[CanvasState], params: list[StepParams]
) -> list[StepResult]:
    """One denoise step for every canvas: hidden [N * C, H] (canvas i is rows i*C .. i*C + C - 1).

    Updates each state in place (tokens, history, self_cond, argmax, step) and returns one result per
    canvas. Canvases run one at a time, so a canvas's result does not depend on what it is batched with;
    the host syncs once, at the end, for the scalar results.
    """
    assert len(states) == len(params) and hidden.shape[0] % max(len(states), 1) == 0
    canvas_length = hidden.shape[0] // max(len(states), 1)
    with torch.no_grad():
        pending = [
            _step_canvas(hidden[i * canvas_length : (i + 1) * canvas_length], head, state, p)
            for i, (state, p) in enumerate(zip(states, params, strict=True))
        ]
        if not pending:
            return []
        scalars = torch.stack([s for _, _, s in pending]).tolist()  # [N, 3]: accepted, entropy, stop
    return [
        StepResult(argmax, int(n), entropy, confidence, bool(stop) or state.step >= p.max_steps, state.step)
        for (argmax, confidence, _), (n, entropy, stop), state, p in zip(
            pending, scalars, states, params, strict=True
        )
    ]


def _step_canvas(
    hidden_tile: Tensor, head: LMHead, state: CanvasState, params: StepParams
) -> tuple[Tensor, Tensor, Tensor]:
    """Step one canvas in place; returns (argmax [C], confidence [C] fp16, [accepted, mean entropy, stop])."""
    assert state.step < params.max_steps, "a finished canvas must not be stepped again"
    assert state.history.shape[0] == params.stability_threshold, "history rows != stability_threshold"
    temp = temperature(state.step, params.max_steps, params.t_min, params.t_max, hidden_tile.device)
    entropy, confidence, argmax, sample, self_cond = _canvas_stats(hidden_tile, head, temp, state.generator)
    if state.pinned is not None:
        entropy, argmax, confidence = apply_pins(state.pinned, state.tokens, entropy, argmax, confidence)
    free = None if state.pinned is None else ~state.pinned
    accepted = accept_mask(entropy, params.entropy_bound)  # [C]
    state.tokens = renoise(state.tokens, sample, accepted, state.pinned, head.vocab_size, state.generator)
    stable = push_history(state, argmax)
    mean_entropy = _mean_entropy(entropy, free)
    stop = stable & (mean_entropy < params.confidence_threshold)
    num_accepted = (accepted if free is None else accepted & free).sum()
    state.self_cond = self_cond
    state.argmax = argmax
    state.accepted = accepted
    state.step += 1
    scalars = torch.stack([num_accepted.float(), mean_entropy.float(), stop.float()])  # [3]
    return argmax, confidence.to(torch.float16), scalars


def _canvas_stats(
    hidden_tile: Tensor, head: LMHead, temp: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(entropy, confidence, argmax, sample, soft embedding) of one canvas: [C] x 4 and [C, H].

    On CUDA the fused Triton kernels (`engine.kernels.fused_sampler`) read the logits once, in the weight
    dtype, and sample by a Gumbel race seeded from `generator`: a different stream from the CPU path's
    inverse CDF for the same seed. Both consume the generator before `renoise` does.
    """
    if use_kernels(hidden_tile.device):
        from engine.kernels.fused_sampler import fused_canvas_step  # imports triton: only when used

        seed = torch.randint(0, 2**62, (1,), generator=generator, device=hidden_tile.device)  # (1,)
        stats, self_cond = fused_canvas_step(
            hidden_tile, head.weight, head.softcap, head.embed_scale, temp, seed
        )
        return stats.entropy, stats.confidence, stats.argmax, stats.sample, self_cond
    return _tiled_canvas_stats(hidden_tile, head, temp, generator)


TILE_BYTES = 1 << 20
"""fp32 logits per row tile of the CPU sampler (1 MiB): the dozen passes over a tile stay in L2."""


def _tiled_canvas_stats(
    hidden_tile: Tensor, head: LMHead, temp: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_canvas_stats` on the CPU: the same ops as `token_entropy`, `argmax`, `sample_tokens` and
    `soft_embedding` on the whole canvas, but run over tiles of rows after the LM head matmul.

    Every op after the matmul is row-wise, so tiling changes no result. `sample_tokens` draws its
    uniforms tile by tile, a fixed order per canvas (on the CPU generator the same numbers as one
    draw for the whole canvas). Tiles keep a slice of the [C, V] logits in cache across the dozen
    passes that would otherwise each stream the whole canvas from memory (the sampler was 55-75% of
    a bench-model step before).
    """
    raw = head.project(hidden_tile)  # [C, V] weight dtype
    num_rows, vocab = raw.shape
    entropy = torch.empty(num_rows, dtype=torch.float32, device=raw.device)
    confidence = torch.empty_like(entropy)
    argmax = torch.empty(num_rows, dtype=torch.long, device=raw.device)
    sample = torch.empty_like(argmax)
    probs = torch.empty_like(raw)  # [C, V] weight dtype: softmax for the soft embedding
    step = max(1, TILE_BYTES // (4 * vocab))
    for lo in range(0, num_rows, step):
        rows = slice(lo, min(lo + step, num_rows))
        processed = tempered_logits(raw[rows], head, temp)  # [R, V] fp32
        entropy[rows], confidence[rows] = token_entropy(processed)
        argmax[rows] = processed.max(dim=-1).indices  # = argmax (the first maximum), 5-15x faster on the CPU
        sample[rows] = sample_tokens(processed, generator)
        # `soft_embedding`'s softmax, cast to the weight dtype; its matmul runs once over the canvas.
        probs[rows] = processed.to(raw.dtype).softmax(dim=-1, dtype=torch.float32)
    self_cond = torch.matmul(probs, head.weight) * head.embed_scale.to(raw.dtype)  # [C, H]
    return entropy, confidence, argmax, sample, self_cond


def apply_pins(
    pinned: Tensor, tokens: Tensor, entropy: Tensor, argmax: Tensor, confidence: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """At pinned positions: entropy 0 (no share of the budget), the pinned token, confidence 1. All [C]."""
    return (
        entropy.masked_fill(pinned, 0.0),
        torch.where(pinned, tokens, argmax),
        confidence.masked_fill(pinned, 1.0),
    )


def push_history(state: CanvasState, argmax: Tensor) -> Tensor:
    """0-d bool: `argmax` equals every row of the history (True when it has none); then push it."""
    if state.history.shape[0] == 0:
        return torch.ones((), dtype=torch.bool, device=argmax.device)
    stable = (state.history == argmax[None, :]).all()
    state.history = torch.roll(state.history, shifts=-1, dims=0)  # [k, C], oldest row now last
    state.history[-1] = argmax
    return stable


def _mean_entropy(entropy: Tensor, free: Tensor | None) -> Tensor:
    """0-d: mean entropy over free positions ([C] each); the reference's plain mean when nothing is pinned."""
    if free is None:
        return entropy.mean()
    return (entropy * free).sum() / free.sum().clamp(min=1)
