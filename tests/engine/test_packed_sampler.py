"""The packed CPU sampler step equals stepping each canvas alone, bit for bit, over several steps."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from engine.packed_sampler import PACKED_BYTES, can_pack, packed_denoise_step
from engine.request import FREE
from engine.sampler import CanvasState, LMHead, StepParams, StepResult, denoise_step, init_canvas
from tests.engine.test_sampler import make_params

VOCAB, HIDDEN, CANVAS = 32, 24, 21


def make_head(dtype: torch.dtype) -> LMHead:
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    return LMHead.tied(weight.to(dtype), softcap=30.0)


def canvases(stabilities: list[int], pinned: list[bool]) -> tuple[list[CanvasState], list[StepParams]]:
    """One canvas per entry, each with its own seed and generator and its own sampler parameters."""
    states, step_params = [], []
    for i, (stability, pins) in enumerate(zip(stabilities, pinned, strict=True)):
        p = make_params(
            max_steps=9,
            t_max=0.8 + 0.1 * i,
            entropy_bound=0.05 * (i + 1),
            stability_threshold=stability,
            confidence_threshold=0.01 * (i + 1),
        )
        canvas = tuple(7 if j % 4 == 1 else FREE for j in range(CANVAS)) if pins else None
        generator = torch.Generator().manual_seed(100 + i)
        states.append(init_canvas(CANVAS, VOCAB, stability, generator, canvas))
        step_params.append(p)
    return states, step_params


def copy_state(state: CanvasState) -> CanvasState:
    generator = torch.Generator()
    generator.set_state(state.generator.get_state())
    return CanvasState(
        state.tokens.clone(),
        None if state.pinned is None else state.pinned.clone(),
        state.history.clone(),
        None if state.self_cond is None else state.self_cond.clone(),
        state.argmax.clone(),
        state.step,
        generator,
    )


def hidden_states(live: list[int], dtype: torch.dtype) -> Tensor:
    """[N * C, H] for the live canvases, the same every step (their argmax settles); canvas i scaled by
    i + 1, so some canvases grow confident and stop early and some do not."""
    gen = torch.Generator().manual_seed(0)
    everyone = torch.randn(max(live) + 1, CANVAS, HIDDEN, generator=gen)
    scales = torch.tensor([float(i + 1) for i in live])[:, None, None]
    return (everyone[live] * scales).flatten(0, 1).to(dtype)


def assert_same(packed: list[StepResult], alone: list[StepResult]) -> None:
    for got, want in zip(packed, alone, strict=True):
        assert torch.equal(got.argmax, want.argmax) and torch.equal(got.confidence, want.confidence)
        assert (got.num_accepted, got.mean_entropy, got.finished, got.step) == (
            want.num_accepted,
            want.mean_entropy,
            want.finished,
            want.step,
        )


def assert_same_states(packed: list[CanvasState], alone: list[CanvasState]) -> None:
    for got, want in zip(packed, alone, strict=True):
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.history, want.history)
        assert got.self_cond is not None and want.self_cond is not None
        assert torch.equal(got.self_cond, want.self_cond) and torch.equal(got.argmax, want.argmax)
        assert got.accepted is not None and want.accepted is not None
        assert torch.equal(got.accepted, want.accepted) and got.step == want.step
        assert torch.equal(got.generator.get_state(), want.generator.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("stabilities", "pinned"),
    [
        ([1, 1, 1, 1, 1], [False] * 5),
        ([2, 2, 2, 2], [False, True, False, True]),
        ([0, 1, 2, 1, 0, 3], [True, False, False, True, False, False]),
        ([0, 0, 0], [False, False, True]),
    ],
)
def test_packed_steps_equal_one_canvas_at_a_time(
    dtype: torch.dtype, stabilities: list[int], pinned: list[bool]
) -> None:
    head = make_head(dtype)
    states, step_params = canvases(stabilities, pinned)
    packed_states = [copy_state(s) for s in states]
    live = list(range(len(states)))
    stopped_early = False
    for _ in range(9):
        if len(live) < 2:
            break
        hidden = hidden_states(live, dtype)
        p = [step_params[i] for i in live]
        alone = denoise_step(hidden, head, [states[i] for i in live], p)
        packed = packed_denoise_step(hidden, head, [packed_states[i] for i in live], p)
        assert_same(packed, alone)
        assert_same_states([packed_states[i] for i in live], [states[i] for i in live])
        stopped_early |= any(r.finished and r.step < 9 for r in alone)
        live = [i for i, r in zip(live, alone, strict=True) if not r.finished]
    assert stopped_early, "the stop rule never fired: the test would not cover it"


def test_can_pack_small_vocabularies_on_the_cpu_only() -> None:
    head = make_head(torch.float32)
    hidden = torch.zeros(4 * CANVAS, HIDDEN)
    assert can_pack(hidden, head, 4)
    assert not can_pack(hidden[:CANVAS], head, 1)  # one canvas: the plain step
    rows = PACKED_BYTES // (4 * VOCAB) + 1
    assert not can_pack(torch.zeros(rows, HIDDEN), head, rows)  # logits over the budget
