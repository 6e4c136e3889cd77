"""The training forward equals the engine's paged forward, and the training logits equal the sampler's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.loader import load_checkpoint
from engine.sampler import logits_for
from recipes.sudoku.dense_forward import (
    EAGER,
    attention_mask,
    compiled_layer_forwards,
    decode_canvases,
    encode_prompts,
    head_logits,
    lm_head,
)
from tests.recipes.helpers import paged_forward, tiny_checkpoint


def _perturbed(path: Path, **overrides: object) -> DiffusionGemma:
    model = load_checkpoint(tiny_checkpoint(path, **overrides), with_tokenizer=False).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.3 if p.ndim == 1 else 0.05) * torch.randn(p.shape, generator=gen))
        for i, layer in enumerate(model.layers):
            layer.layer_scalar.fill_(0.7 + 0.1 * i)
            layer.encoder_layer_scalar.fill_(1.3 - 0.1 * i)
    return model


@pytest.mark.parametrize("window", [256, 5])
def test_dense_forward_matches_engine(tmp_path: Path, window: int) -> None:
    model = _perturbed(tmp_path, sliding_window=window)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 32, (3, 82), generator=gen)
    canvases = torch.randint(0, 32, (3, 82), generator=gen)
    soft = torch.randn(3, 82, model.config.hidden_size, generator=gen)
    for s in (None, soft):
        with torch.no_grad():
            ours = decode_canvases(model, encode_prompts(model, prompts), canvases, s)
            engine = paged_forward(model, prompts, canvases, s)
        torch.testing.assert_close(ours, engine, atol=2e-5, rtol=1e-4)
    head = lm_head(model)
    torch.testing.assert_close(head_logits(ours[0], head), logits_for(ours[0], head))


@pytest.mark.parametrize("window", [256, 5])
def test_several_canvases_per_prompt_match_repeated_prompts(tmp_path: Path, window: int) -> None:
    """Canvases 2i and 2i + 1 read prompt i: the same as giving each canvas its own copy of the prompt,
    in values and in the gradients that flow back through the shared prompt encoding."""
    model = _perturbed(tmp_path, sliding_window=window).requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 32, (2, 82), generator=gen)
    canvases = torch.randint(0, 32, (4, 82), generator=gen)
    results = []
    for prompt_rows in (prompts, prompts.repeat_interleave(2, dim=0)):
        model.zero_grad()
        hidden = decode_canvases(model, encode_prompts(model, prompt_rows), canvases)
        hidden.square().mean().backward()
        results.append((hidden.detach(), model.embed_tokens.weight.grad.clone()))
    (shared, shared_grad), (repeated, repeated_grad) = results
    torch.testing.assert_close(shared, repeated, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shared_grad, repeated_grad, atol=2e-5, rtol=1e-3)


def test_compiled_layers_match_eager_values_and_gradients(tmp_path: Path) -> None:
    model = _perturbed(tmp_path).requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, 32, (2, 82), generator=gen)
    canvases = torch.randint(0, 32, (2, 82), generator=gen)
    results = []
    for forwards in (EAGER, compiled_layer_forwards()):
        model.zero_grad()
        hidden = decode_canvases(model, encode_prompts(model, prompts, forwards), canvases, None, forwards)
        hidden.square().mean().backward()
        results.append((hidden.detach(), model.embed_tokens.weight.grad.clone()))
    (eager, eager_grad), (compiled, compiled_grad) = results
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=2e-5, rtol=1e-3)


def test_mask_semantics() -> None:
    mask = attention_mask(3, 2, None, torch.device("cpu"))
    assert mask[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril()) and not mask[:3, 3:].any()
    assert mask[3:].all()
    windowed = attention_mask(4, 2, 2, torch.device("cpu"))
    assert windowed[3].tolist() == [False, False, True, True, False, False]
    assert windowed[4].tolist() == [False, False, False, True, True, True]  # last W - 1 = 1 cached
