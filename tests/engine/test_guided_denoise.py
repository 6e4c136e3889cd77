"""Guided denoising: a grammar's skeleton pinned into the canvas, refused accepted tokens re-noised.

On a random tiny model the outputs must still all validate with either option on, requests without a
grammar must not notice, and with the options off nothing of it runs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
import torch

from engine import commit, guided_denoise
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.guided import GrammarCompiler
from engine.guided_denoise import first_refused, renoise_refused, skeleton_pins
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import FREE, CanvasSnapshot, GrammarSpec, SamplingParams
from engine.sampler import init_canvas
from tests.engine.checkpoints import CANVAS, VOCAB, save_servable
from tests.engine.test_structured import BATTERY, SEEDS

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
}
GUIDED = EngineConfig(
    max_num_seqs=SEEDS,
    max_num_batched_tokens=SEEDS * CANVAS + 512,
    guided_pin_skeleton=True,
    guided_renoise=True,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return load_checkpoint(save_servable(tmp_path_factory.mktemp("tiny"), seed=6))


def llm_with(checkpoint: Checkpoint, config: EngineConfig) -> LLM:
    return LLM(Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config))


@pytest.fixture(scope="module")
def grammars(checkpoint: Checkpoint) -> GrammarCompiler:
    return GrammarCompiler(checkpoint.tokenizer, VOCAB, checkpoint.defaults.eos_token_ids)


def ids(checkpoint: Checkpoint, text: str) -> list[int]:
    return list(checkpoint.tokenizer.encode(text, add_special_tokens=False))


def matcher_for(grammars: GrammarCompiler, spec: GrammarSpec, checkpoint: Checkpoint) -> Any:
    return grammars.matcher(spec, checkpoint.defaults.eos_token_ids, ())


def test_first_refused_walks_the_leading_accepted_run_and_restores_the_matcher(
    checkpoint: Checkpoint, grammars: GrammarCompiler
) -> None:
    matcher = matcher_for(grammars, GrammarSpec("regex", "[0-9]+x"), checkpoint)
    tokens = ids(checkpoint, "12a4")
    assert first_refused(matcher, tokens, [True] * 4, budget=16) == 2
    assert first_refused(matcher, tokens, [True, True, False, True], budget=16) is None  # the run ends at 2
    assert first_refused(matcher, tokens, [True] * 4, budget=2) is None  # past the output left: not walked
    assert first_refused(matcher, ids(checkpoint, "a"), [True], budget=16) == 0
    # Still at the grammar's start: a digit is allowed, "x" is not.
    assert not matcher.accept_token(ids(checkpoint, "x")[0]) and matcher.accept_token(ids(checkpoint, "7")[0])


def test_skeleton_pins_take_the_forced_prefix_up_to_the_first_pin_and_the_budget(
    checkpoint: Checkpoint, grammars: GrammarCompiler
) -> None:
    matcher = matcher_for(grammars, GrammarSpec("json_schema", json.dumps(PERSON)), checkpoint)
    forced = ids(checkpoint, '{"name": "')
    pins = skeleton_pins(matcher, None, CANVAS, budget=100)
    assert pins == (*forced, *[FREE] * (CANVAS - len(forced)))
    assert skeleton_pins(matcher, None, CANVAS, budget=3) == (*forced[:3], *[FREE] * (CANVAS - 3))
    user = (FREE,) * 4 + (50,) + (FREE,) * (CANVAS - 5)
    assert skeleton_pins(matcher, user, CANVAS, budget=100) == (*forced[:4], 50, *[FREE] * (CANVAS - 5))
    free_text = matcher_for(grammars, GrammarSpec("regex", "[a-z]+"), checkpoint)
    assert skeleton_pins(free_text, None, CANVAS, budget=100) is None  # nothing forced: no pins


def test_renoise_refused_redraws_one_refused_token_and_never_a_pin(
    checkpoint: Checkpoint, grammars: GrammarCompiler
) -> None:
    matcher = matcher_for(grammars, GrammarSpec("regex", "[0-9]{16}"), checkpoint)
    canvas = ids(checkpoint, "12a4" + "5" * 12)
    generator = torch.Generator().manual_seed(0)
    state = init_canvas(CANVAS, VOCAB, 1, generator)
    state.tokens = torch.tensor(canvas)
    state.accepted = torch.ones(CANVAS, dtype=torch.bool)
    assert renoise_refused(state, matcher, CANVAS, VOCAB) == 2
    assert not state.accepted[2] and state.accepted.sum() == CANVAS - 1
    kept = [t for p, t in enumerate(state.tokens.tolist()) if p != 2]
    assert kept == [t for p, t in enumerate(canvas) if p != 2]
    pinned = init_canvas(CANVAS, VOCAB, 1, generator, tuple(canvas))  # every position pinned, "a" too
    pinned.accepted = torch.zeros(CANVAS, dtype=torch.bool)
    assert renoise_refused(pinned, matcher, CANVAS, VOCAB) is None
    assert pinned.tokens.tolist() == canvas


@pytest.mark.parametrize("name", ["nested objects", "enums", "optional keys", "array with min/max items"])
def test_guided_outputs_validate(checkpoint: Checkpoint, name: str) -> None:
    schema = BATTERY[name]
    spec = GrammarSpec("json_schema", json.dumps(schema))
    params = [
        SamplingParams(max_tokens=8 * CANVAS, max_denoising_steps=4, seed=s, grammar=spec)
        for s in range(SEEDS)
    ]
    results = llm_with(checkpoint, GUIDED).generate([[2, 40 + s % 50] for s in range(SEEDS)], params)
    for seed, result in enumerate(results):
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema)


def test_refused_tokens_are_renoised_and_the_skeleton_stays_pinned(checkpoint: Checkpoint) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    refused: list[int | None] = []
    real = guided_denoise.first_refused

    def spy(*args: Any) -> int | None:
        refused.append(real(*args))
        return refused[-1]

    snapshots: list[CanvasSnapshot] = []
    llm = llm_with(checkpoint, GUIDED)
    params = [SamplingParams(max_tokens=64, max_denoising_steps=6, seed=s, grammar=spec) for s in range(8)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guided_denoise, "first_refused", spy)
        results = llm.generate([[2, 41]] * 8, params, callback=lambda i, s: snapshots.append(s))
    assert any(r is not None for r in refused), "a random model's accepted tokens break the grammar"
    forced = ids(checkpoint, '{"name": "')
    first = [s for s in snapshots if s.canvas_index == 0]
    assert first and all(s.pinned == list(range(len(forced))) for s in first)
    assert all(s.token_ids[: len(forced)] == forced for s in first)
    assert all(s.confidence[: len(forced)] == [1.0] * len(forced) for s in first)
    for result in results:
        jsonschema.validate(json.loads(result.text), PERSON)


def test_with_the_options_off_nothing_is_pinned_or_walked(checkpoint: Checkpoint) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    snapshots: list[CanvasSnapshot] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commit, "renoise_refused", None)  # calling either would fail
        patch.setattr(commit, "skeleton_pins", None)
        llm = llm_with(checkpoint, replace(GUIDED, guided_pin_skeleton=False, guided_renoise=False))
        params = SamplingParams(max_tokens=64, max_denoising_steps=4, seed=0, grammar=spec)
        (result,) = llm.generate([[2, 41]], params, callback=lambda i, s: snapshots.append(s))
    assert snapshots and all(s.pinned == [] for s in snapshots)
    jsonschema.validate(json.loads(result.text), PERSON)


def test_requests_without_a_grammar_do_not_notice_guided_neighbours(checkpoint: Checkpoint) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    plain = [SamplingParams(max_tokens=48, max_denoising_steps=5, seed=s) for s in range(4)]
    prompts = [[2, 40 + s] for s in range(4)]
    alone = llm_with(checkpoint, GUIDED).generate(prompts, plain)
    mixed = llm_with(checkpoint, GUIDED).generate(
        prompts * 2, plain + [replace(p, grammar=spec) for p in plain]
    )
    assert [r.token_ids for r in mixed[:4]] == [r.token_ids for r in alone]


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_pinned_token_the_grammar_allows_is_committed_with_or_without_logprobs(
    checkpoint: Checkpoint, logprobs: int | None
) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    z = ids(checkpoint, "z")[0]
    pins = (FREE,) * 10 + (z,) + (FREE,) * (CANVAS - 11)  # the name's first character
    params = [
        SamplingParams(
            max_tokens=64, max_denoising_steps=3, seed=s, grammar=spec, pinned_canvas=pins, logprobs=logprobs
        )
        for s in range(8)
    ]
    for result in llm_with(checkpoint, GUIDED).generate([[2, 41]] * 8, params):
        assert result.text.startswith('{"name": "z'), result.text
        jsonschema.validate(json.loads(result.text), PERSON)
