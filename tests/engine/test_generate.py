"""Offline generation: block loop, stop ids and max_tokens, against the transformers `generate` loop.

Sampling is random in both implementations with different generators, so the end-to-end comparison
replaces randomness with the same deterministic stand-ins on both sides: `torch.randint` returns a
counter-based pattern (both loops draw the initial canvas and each step's re-noise in the same order)
and sampling takes the argmax. Everything else (temperature schedule, entropy-bound acceptance,
re-noise, adaptive stop, block commits, stop ids) then runs for real and must agree token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion

from engine import sampler
from engine.canvas_end import end_canvas
from engine.config import DiffusionDefaults
from engine.generate import generate
from engine.model.loader import load_checkpoint
from engine.request import FREE, InvalidParams, SamplingParams
from tests.engine.checkpoints import CANVAS, VOCAB, save_reference, save_tokenizer

STEPS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiffusionGemmaForBlockDiffusion]:
    path = tmp_path_factory.mktemp("tiny")
    model = save_reference(path, seed=2)
    save_tokenizer(path)
    return path, model


class FakeRandint:
    """`torch.randint` stand-in: values depend only on the call count and the requested size."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        bound = dict(zip(("low", "high", "size"), args, strict=False)) | kwargs  # both call sites' forms
        low, high, size = bound.get("low", 0), bound["high"], bound["size"]
        n = int(torch.Size(size).numel())
        values = (torch.arange(n) * 104_729 + self.calls * 7_919) % (high - low) + low
        self.calls += 1
        return values.view(size).to(kwargs.get("device") or "cpu")


@contextmanager
def deterministic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(torch, "randint", FakeRandint())
        m.setattr(torch, "multinomial", lambda probs, num_samples: probs.argmax(-1, keepdim=True))
        m.setattr(sampler, "sample_tokens", lambda processed, generator: processed.argmax(-1))
        yield


class StepCounter:
    """A transformers streamer that records decoder passes per block."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def put(self, value: Tensor) -> None:
        self.steps.append(0)

    def put_draft(self, value: Tensor) -> None:
        self.steps[-1] += 1

    def end(self) -> None:
        pass


def reference_generate(
    model: DiffusionGemmaForBlockDiffusion, prompt: list[int], max_tokens: int, eos: list[int], **knobs: Any
) -> tuple[list[int], list[int]]:
    """(generated tokens cut before the first eos, steps per block) from transformers."""
    counter = StepCounter()
    if "entropy_bound" in knobs:
        knobs["sampler_config"] = _bound(knobs.pop("entropy_bound"))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=0,
            streamer=counter,
            **knobs,
        )
    generated = out.sequences[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(generated) if t in eos), len(generated))
    return generated[: min(cut, max_tokens)], counter.steps[:-1]  # a put() follows each block


KNOBS = dict(
    max_denoising_steps=STEPS, t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005
)


def ours_generate(path: Path, prompt: list[int], max_tokens: int, eos: list[int], **knobs: Any) -> Any:
    checkpoint = load_checkpoint(path, with_tokenizer=False)
    params = SamplingParams(
        max_tokens=max_tokens,
        stop_token_ids=tuple(eos),
        seed=0,
        max_denoising_steps=knobs["max_denoising_steps"],
        t_min=knobs["t_min"],
        t_max=knobs["t_max"],
        stability_threshold=knobs["stability_threshold"],
        confidence_threshold=knobs["confidence_threshold"],
        entropy_bound=knobs.get("entropy_bound", 0.1),
    )
    (result,) = generate(checkpoint.model, checkpoint.defaults, [prompt], params)
    return result


PROMPT = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]  # 11 tokens: longer than the sliding window


@pytest.mark.parametrize("max_tokens", [CANVAS, 2 * CANVAS + 5])
def test_blocks_and_length_match_the_reference(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion], monkeypatch: pytest.MonkeyPatch, max_tokens: int
) -> None:
    path, model = checkpoint
    with deterministic(monkeypatch):
        expected, expected_steps = reference_generate(model, PROMPT, max_tokens, [VOCAB + 1], **KNOBS)
    with deterministic(monkeypatch):
        result = ours_generate(path, PROMPT, max_tokens, [VOCAB + 1], **KNOBS)
    assert len(expected_steps) == -(-max_tokens // CANVAS)
    assert result.token_ids == expected
    assert len(result.token_ids) == max_tokens
    assert result.finish_reason == "length"
    assert result.steps_per_canvas == expected_steps


def test_adaptive_stop_matches_the_reference(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a confidence threshold just above a mid-block mean entropy, blocks end early, at the
    same step as in the reference. (A random model's argmax never settles, so stability is off.)"""
    path, model = checkpoint
    ckpt = load_checkpoint(path, with_tokenizer=False)
    entropies: list[float] = []
    free = SamplingParams(
        max_tokens=CANVAS, max_denoising_steps=12, stability_threshold=0, seed=0, stop_token_ids=()
    )
    with deterministic(monkeypatch):
        generate(
            ckpt.model,
            ckpt.defaults,
            [PROMPT],
            free,
            callback=lambda i, snap: entropies.append(snap.mean_entropy),
        )
    lowest = min(range(12), key=lambda i: entropies[i])
    assert lowest < 11, "entropy keeps falling to the last step: pick another seed"
    knobs = KNOBS | dict(
        max_denoising_steps=12, stability_threshold=0, confidence_threshold=entropies[lowest] + 1e-4
    )
    with deterministic(monkeypatch):
        expected, expected_steps = reference_generate(model, PROMPT, 3 * CANVAS, [VOCAB + 1], **knobs)
    with deterministic(monkeypatch):
        result = ours_generate(path, PROMPT, 3 * CANVAS, [VOCAB + 1], **knobs)
    assert expected_steps[0] == lowest + 1
    assert result.steps_per_canvas == expected_steps
    assert result.token_ids == expected


def _bound(value: float) -> Any:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    return EntropyBoundSamplerConfig(entropy_bound=value)


def test_stop_id_in_a_later_block_matches_the_reference(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = checkpoint
    with deterministic(monkeypatch):
        free_run, _ = reference_generate(model, PROMPT, 3 * CANVAS, [VOCAB + 1], **KNOBS)
    first_seen = {}
    for i, token in enumerate(free_run):
        first_seen.setdefault(token, i)
    stop = next(t for t, i in sorted(first_seen.items(), key=lambda kv: kv[1]) if i > CANVAS + 2)
    with deterministic(monkeypatch):
        expected, expected_steps = reference_generate(model, PROMPT, 3 * CANVAS, [stop], **KNOBS)
    with deterministic(monkeypatch):
        result = ours_generate(path, PROMPT, 3 * CANVAS, [stop], **KNOBS)
    assert result.finish_reason == "stop"
    assert result.token_ids == expected
    assert len(expected) == first_seen[stop]
    assert len(result.steps_per_canvas) == len(expected_steps) == 2


def test_end_block_cuts_at_stop_then_length() -> None:
    assert end_canvas([5, 9, 1, 7], 6, 10, (1,)).new_token_ids == [5, 9]
    assert end_canvas([5, 9, 1, 7], 6, 10, (1,)).finish_reason == "stop"
    assert end_canvas([5, 9, 3, 7], 5, 10, (1,)).finish_reason is None
    assert end_canvas([5, 9, 3, 7], 6, 10, (1,)).finish_reason == "length"  # exactly max_tokens
    assert end_canvas([5, 9, 3, 7], 8, 10, (1,)) == end_canvas([5, 9], 8, 10, ())
    assert end_canvas([5, 9, 3, 7], 8, 10, (1,)).finish_reason == "length"
    assert end_canvas([5, 1, 3, 7], 9, 10, (1,)).new_token_ids == [5]
    assert end_canvas([5, 1, 3, 7], 9, 10, (1,)).finish_reason == "length"  # the stop lies past max_tokens
    assert end_canvas([1, 2], 0, 10, (1,)).new_token_ids == []


def test_seeded_generation_is_reproducible_and_batch_independent(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion],
) -> None:
    path, _ = checkpoint
    ckpt = load_checkpoint(path, with_tokenizer=False)
    params = SamplingParams(max_tokens=2 * CANVAS, max_denoising_steps=4, seed=7, stop_token_ids=())
    (alone,) = generate(ckpt.model, ckpt.defaults, [PROMPT], params)
    (again,) = generate(ckpt.model, ckpt.defaults, [PROMPT], params)
    others = [
        SamplingParams(max_tokens=CANVAS, max_denoising_steps=3, seed=s, stop_token_ids=()) for s in (1, 2)
    ]
    batched = generate(
        ckpt.model, ckpt.defaults, [[2, 50, 51], PROMPT, [2, 60]], [others[0], params, others[1]]
    )
    assert alone.token_ids == again.token_ids
    assert batched[1].token_ids == alone.token_ids
    assert len(batched[0].token_ids) == CANVAS


def test_text_callback_and_pinned_positions(checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion]) -> None:
    path, _ = checkpoint
    ckpt = load_checkpoint(path)
    prompt = ckpt.tokenizer("hello").input_ids
    pinned = [FREE] * CANVAS
    pinned[3], pinned[8] = 40, 41
    params = SamplingParams(
        max_tokens=CANVAS, max_denoising_steps=3, seed=1, stop_token_ids=(), pinned_canvas=tuple(pinned)
    )
    seen: list[tuple[int, int]] = []
    (result,) = generate(
        ckpt.model,
        ckpt.defaults,
        [prompt],
        params,
        callback=lambda i, snap: seen.append((i, snap.canvas_index)),
        tokenizer=ckpt.tokenizer,
    )
    assert result.token_ids[3] == 40 and result.token_ids[8] == 41
    assert result.text == ckpt.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert seen == [(0, 0)] * result.steps_per_canvas[0]


def test_bad_requests_are_rejected_with_a_message(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion],
) -> None:
    path, _ = checkpoint
    ckpt = load_checkpoint(path, with_tokenizer=False)
    with pytest.raises(InvalidParams, match="empty"):
        generate(ckpt.model, ckpt.defaults, [[]])
    with pytest.raises(InvalidParams, match="outside"):
        generate(ckpt.model, ckpt.defaults, [[VOCAB + 3]])
    with pytest.raises(InvalidParams, match="max_tokens"):
        generate(ckpt.model, ckpt.defaults, [PROMPT], SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidParams, match="pinned_canvas"):
        generate(ckpt.model, ckpt.defaults, [PROMPT], SamplingParams(pinned_canvas=(1, 2)))
    with pytest.raises(InvalidParams, match="t_max"):
        SamplingParams(t_min=0.9, t_max=0.5)
    assert DiffusionDefaults().max_denoising_steps == 48
