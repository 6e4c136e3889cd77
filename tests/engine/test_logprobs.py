"""Logprobs of committed tokens: the arithmetic, and parity with the transformers reference's logits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion

from engine import runner as runner_module
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.logprobs import token_logprobs
from engine.model.loader import load_checkpoint
from engine.request import InvalidParams, SamplingParams
from tests.engine.checkpoints import CANVAS, save_reference, save_tokenizer
from tests.engine.model_harness import Reference


def test_token_logprobs_normalise_sort_and_skip_masked_tokens() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -float("inf")], [1.0, 1.0, 1.0]])
    first, second = token_logprobs(logits, torch.tensor([1, 2]), k=3)
    assert first.token_id == 1 and first.logprob == pytest.approx(math.log(0.75))
    assert [t for t, _ in first.top] == [1, 0], "sorted, the masked token left out"
    assert first.top[1][1] == pytest.approx(math.log(0.25))
    assert second.logprob == pytest.approx(-math.log(3.0)) and len(second.top) == 3
    (only,) = token_logprobs(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), k=0)
    assert only.top == () and only.logprob == pytest.approx(-math.log1p(math.exp(-2.0)))


def test_logprobs_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidParams, match="logprobs=21 must be <= 20"):
        SamplingParams(logprobs=21)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiffusionGemmaForBlockDiffusion]:
    path = tmp_path_factory.mktemp("tiny")
    model = save_reference(path, seed=3)
    save_tokenizer(path)
    return path, model


def test_logprobs_equal_the_reference_logits_of_the_committed_canvases(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One denoise step per canvas: its decoder input is the initial noise with no self-conditioning,
    which we record and replay through the reference, canvas after committed canvas."""
    path, reference = checkpoint
    inputs: list[Tensor] = []
    real_step = runner_module.step_canvases

    def recording(hidden: Tensor, head: Any, states: list[Any], params: list[Any]) -> Any:
        inputs.extend(s.tokens.clone() for s in states)
        return real_step(hidden, head, states, params)

    monkeypatch.setattr(runner_module, "step_canvases", recording)
    loaded = load_checkpoint(path)
    engine = Engine(loaded.model, loaded.defaults, loaded.tokenizer, EngineConfig())
    prompt = [2, 40, 41, 42, 43, 44]
    params = SamplingParams(
        max_tokens=2 * CANVAS, max_denoising_steps=1, seed=7, stop_token_ids=(), logprobs=5
    )
    (result,) = LLM(engine).generate([prompt], params)
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) == 2 * CANVAS
    assert len(inputs) == 2

    ref = Reference(reference)
    ref.encode(torch.tensor(prompt), 0)
    for c, noise in enumerate(inputs):
        expected = ref.decode(noise).double().log_softmax(-1)  # [C, V]
        committed = result.token_ids[c * CANVAS : (c + 1) * CANVAS]
        for position, (token, entry) in enumerate(
            zip(committed, result.logprobs[c * CANVAS :], strict=False)
        ):
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
            values = [lp for _, lp in entry.top]
            assert len(entry.top) == 5 and values == sorted(values, reverse=True)
            assert entry.top[0][0] == token, "the argmax commit is the most likely token"
            want_top = expected[position].topk(5)
            assert [i for i, _ in entry.top] == want_top.indices.tolist()
            assert values == pytest.approx(want_top.values.tolist(), abs=1e-4)
        ref.encode(torch.tensor(committed), len(prompt) + c * CANVAS)


def test_requests_without_logprobs_get_none(checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion]) -> None:
    loaded = load_checkpoint(checkpoint[0])
    engine = Engine(loaded.model, loaded.defaults, loaded.tokenizer, EngineConfig())
    plain, asked = LLM(engine).generate(
        [[2, 40], [2, 40]],
        [SamplingParams(max_tokens=5, seed=1), SamplingParams(max_tokens=5, seed=1, logprobs=0)],
    )
    assert plain.logprobs is None and plain.token_ids == asked.token_ids
    assert asked.logprobs is not None and len(asked.logprobs) == len(asked.token_ids)
    assert all(e.top == () for e in asked.logprobs)
