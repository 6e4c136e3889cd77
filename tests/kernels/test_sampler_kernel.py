"""The fused sampler kernels against the torch reference in `engine.sampler`."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels import dispatch
from engine.kernels.fused_sampler import fused_canvas_step, row_stats
from engine.sampler import (
    LMHead,
    StepParams,
    StepResult,
    denoise_step,
    init_canvas,
    logits_for,
    soft_embedding,
    temperature,
    token_entropy,
)

VOCAB = 1000  # not a power of two: the last vocabulary tile is partial


def reference(logits: torch.Tensor, softcap: float | None, temp: torch.Tensor) -> torch.Tensor:
    processed = logits.float()
    if softcap is not None:
        processed = processed.div(softcap).tanh().mul(softcap)
    return processed / temp


@pytest.mark.parametrize(
    ("softcap", "temp", "dtype"), [(30.0, 0.7, torch.float32), (None, 1.3, torch.bfloat16)]
)
def test_row_stats_match_reference(
    softcap: float | None, temp: float, dtype: torch.dtype, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, VOCAB, generator=gen) * 4).to(dtype).to(device)
    logits[2, 17] = 60.0  # a confident row: entropy near 0 must stay accurate
    t = torch.tensor(temp, dtype=torch.float32, device=device)
    stats = row_stats(logits, softcap, t, torch.tensor([7], device=device))
    processed = reference(logits, softcap, t)
    entropy, confidence = token_entropy(processed.clone())
    torch.testing.assert_close(stats.entropy, entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.confidence, confidence, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.argmax, processed.argmax(dim=-1))
    rounded = processed.to(dtype).float()
    torch.testing.assert_close(stats.round_max, rounded.amax(-1))
    torch.testing.assert_close(stats.round_sum, (rounded - rounded.amax(-1, keepdim=True)).exp().sum(-1))


def test_sample_is_seeded_and_follows_softmax(device: torch.device) -> None:
    """Same seed, same draws (also for a prefix of the rows); the draws follow softmax (chi-square)."""
    rows = 200  # the interpreter runs ~60 programs (rows) a second: keep this small
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.07, 0.0])
    logits = probs.clamp(min=1e-30).log().repeat(rows, 1).to(device)
    t = torch.ones((), device=device)
    draws = [row_stats(logits, None, t, torch.tensor([s], device=device)).sample.cpu() for s in (1, 2)]
    prefix = row_stats(logits[:16], None, t, torch.tensor([1], device=device)).sample.cpu()
    assert torch.equal(prefix, draws[0][:16]) and not torch.equal(draws[0], draws[1])
    counts = torch.bincount(torch.cat(draws), minlength=probs.numel()).double()
    assert counts[-1] == 0, "a zero-probability token was drawn"
    expected = probs[:-1].double() * counts.sum()
    chi2 = float(((counts[:-1] - expected) ** 2 / expected).sum())
    assert chi2 < 22.1, f"chi-square {chi2:.1f} over 5 dof"  # 22.1: the 0.9995 quantile


def test_fused_canvas_step_matches_reference(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden_size = 32
    weight = (torch.randn(VOCAB, hidden_size, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    hidden = torch.randn(8, hidden_size, generator=gen).to(torch.bfloat16).to(device)
    head = LMHead.tied(weight, 30.0)
    temp = temperature(1, 4, 0.4, 0.8, device)
    stats, soft = fused_canvas_step(
        hidden, weight, 30.0, head.embed_scale, temp, torch.tensor([3], device=device)
    )
    processed = logits_for(hidden, head).div_(temp)
    entropy, _ = token_entropy(processed.clone())
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(stats.argmax, processed.argmax(dim=-1))
    expected = soft_embedding(processed, head)
    torch.testing.assert_close(soft.float(), expected.float(), atol=0.05, rtol=0.02)
    assert math.isfinite(float(stats.entropy.sum()))


def test_denoise_step_dispatches_to_kernels(device: torch.device) -> None:
    """`denoise_step` through the kernels: same argmax and entropies as the torch path, a valid canvas."""
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(VOCAB, 16, generator=gen) * 0.5).to(device)
    hidden = torch.randn(2 * 8, 16, generator=gen).to(device)
    head = LMHead.tied(weight, 30.0)
    params = [
        StepParams(
            max_steps=4,
            t_min=0.4,
            t_max=0.8,
            entropy_bound=0.5,
            confidence_threshold=0.1,
            stability_threshold=1,
        )
    ] * 2

    def run(kernels: bool) -> list[StepResult]:
        states = [
            init_canvas(8, VOCAB, 1, torch.Generator(device=device).manual_seed(i), None, device)
            for i in range(2)
        ]
        with dispatch.force(kernels):
            results = denoise_step(hidden, head, states, params)
        assert all(s.self_cond is not None and s.self_cond.shape == (8, 16) for s in states)
        assert all(int(s.tokens.min()) >= 0 and int(s.tokens.max()) < VOCAB for s in states)
        return results

    for fused, ref in zip(run(True), run(False), strict=True):
        assert torch.equal(fused.argmax, ref.argmax) and fused.finished == ref.finished
        assert math.isclose(fused.mean_entropy, ref.mean_entropy, rel_tol=1e-4)
