"""Structured outputs on a random tiny model: the grammar alone must make every output valid.

A random model knows nothing about JSON, so each output that parses and validates does so because
every committed canvas was decoded under the grammar's token mask.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.guided import CACHED_GRAMMARS, MAX_SPEC_CHARS, allowed_ids, allowed_tokens, masked_argmax
from engine.llm import LLM
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import GrammarSpec, InvalidParams, SamplingParams
from engine.schema_features import unsupported_features
from tests.engine.checkpoints import CANVAS, save_servable

SEEDS = 50

BATTERY: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                },
                "required": ["id", "name"],
            }
        },
        "required": ["user"],
    },
    "array with min/max items": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
    },
    "integer range": {"type": "integer", "minimum": 10, "maximum": 99},
    "string pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "booleans": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "done": {"type": "boolean"}},
        "required": ["ok", "done"],
    },
    "optional keys": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "string", "maxLength": 4},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
    },
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    checkpoint: Checkpoint = load_checkpoint(save_servable(tmp_path_factory.mktemp("tiny"), seed=6))
    config = EngineConfig(max_num_seqs=SEEDS, max_num_batched_tokens=SEEDS * CANVAS + 512)
    return LLM(Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config))


def constrained(
    spec: GrammarSpec, seed: int, max_tokens: int = 8 * CANVAS, steps: int = 1, **knobs: Any
) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, max_denoising_steps=steps, seed=seed, grammar=spec, **knobs)


@pytest.mark.parametrize("name", list(BATTERY))
def test_every_output_validates_against_its_schema(llm: LLM, name: str) -> None:
    schema = BATTERY[name]
    spec = GrammarSpec("json_schema", json.dumps(schema))
    results = llm.generate(
        [[2, 40 + s % 50] for s in range(SEEDS)], [constrained(spec, s) for s in range(SEEDS)]
    )
    for seed, result in enumerate(results):
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema)


def test_regex_choice_grammar_and_json_object(llm: LLM) -> None:
    specs = [
        (GrammarSpec("regex", "[1-9]{20}"), lambda text: re.fullmatch("[1-9]{20}", text)),
        (
            GrammarSpec("choice", json.dumps(["yes", "no", "maybe so"])),
            lambda text: text in {"yes", "no", "maybe so"},
        ),
        (GrammarSpec("grammar", 'root ::= "(" [a-c]* ")"'), lambda text: re.fullmatch(r"\([a-c]*\)", text)),
        (GrammarSpec("json_object"), lambda text: isinstance(json.loads(text), dict)),
    ]
    for spec, check in specs:
        results = llm.generate([[2, 41]] * 8, [constrained(spec, s) for s in range(8)])
        for result in results:
            assert result.finish_reason in ("stop", "length")
            if result.finish_reason == "stop":
                assert check(result.text), (spec, result.text)
        if spec.kind != "json_object":  # bounded languages always finish
            assert all(r.finish_reason == "stop" for r in results), spec


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(llm: LLM) -> None:
    (result,) = llm.generate([[2, 41]], constrained(GrammarSpec("regex", "[a-z]{40}"), 0, max_tokens=25))
    assert result.finish_reason == "length" and re.fullmatch("[a-z]{25}", result.text)


def test_logprobs_of_a_constrained_output_are_under_the_mask(llm: LLM) -> None:
    (result,) = llm.generate([[2, 41]], constrained(GrammarSpec("regex", "[0-9]{5}"), 0, logprobs=20))
    assert result.logprobs is not None and len(result.logprobs) == 5  # the stop id is not output
    digits = set(llm.engine.tokenizer.convert_tokens_to_ids(list("0123456789")))
    for entry in result.logprobs:
        assert {t for t, _ in entry.top} == digits, "only the allowed tokens are alternatives"
        assert entry.top[0][0] == entry.token_id


def test_unsupported_schema_features_are_named() -> None:
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}, "b": {"format": "isbn"}}}
    problems = unsupported_features(schema)
    assert problems == [
        "'not' (negation) at #/properties/a",
        "format 'isbn' at #/properties/b (supported: date, date-time, duration, email, hostname, ipv4, "
        "ipv6, time, uri, uuid)",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("json_schema", '{"allOf": [{"type": "integer"}]}'), "'allOf' \\(intersections\\) at #"),
        (GrammarSpec("json_schema", "{bad"), "json_schema is not valid JSON"),
        (GrammarSpec("regex", "[a-"), "regex could not be compiled"),
        (GrammarSpec("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
        (GrammarSpec("choice", "[]"), "choice must be a non-empty list of strings"),
    ],
)
def test_bad_grammars_are_refused_at_admission(llm: LLM, spec: GrammarSpec, message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        llm.engine.add_request("bad", [2, 40], constrained(spec, 0))


def test_preemption_resumes_the_grammar(tmp_path: Path) -> None:
    """A cache too small for all requests preempts some; their grammars resume after their output."""
    checkpoint = load_checkpoint(save_servable(tmp_path, seed=6))
    config = EngineConfig(
        max_num_seqs=4, num_full_blocks=14, block_size=8, max_num_batched_tokens=4 * CANVAS + 64
    )
    llm = LLM(Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, config))
    spec = GrammarSpec("regex", "[a-z]{20}[0-9]{20}")
    results = llm.generate([[2, 40]] * 4, [constrained(spec, s, max_tokens=48, steps=3) for s in range(4)])
    assert llm.engine.stats.num_preemptions > 0
    for result in results:
        assert result.finish_reason == "stop" and re.fullmatch("[a-z]{20}[0-9]{20}", result.text)


@pytest.mark.parametrize("density", [0.0005, 0.3, 0.999])
def test_masked_argmax_is_the_argmax_over_allowed_tokens(density: float) -> None:
    vocab_size = 5000
    gen = torch.Generator().manual_seed(int(density * 1000))
    for _ in range(20):
        row = torch.randn(vocab_size, generator=gen)
        allowed = torch.rand(vocab_size, generator=gen) < density
        allowed[int(torch.randint(vocab_size, (1,), generator=gen))] = True
        bits = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)
        bits[:vocab_size] = allowed.long()
        words = (bits.view(-1, 32) << torch.arange(32)).sum(-1)  # [W] as unsigned 32-bit values
        bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)[None]
        assert torch.equal(allowed_tokens(bitmask, vocab_size), allowed)
        assert torch.equal(allowed_ids(bitmask, vocab_size), allowed.nonzero().squeeze(1))
        assert masked_argmax(row, bitmask) == int(torch.where(allowed, row, -float("inf")).argmax())


def test_grammar_cache_is_bounded_and_long_specs_are_refused(llm: LLM) -> None:
    grammars = llm.engine.grammars
    for n in range(CACHED_GRAMMARS + 5):
        grammars.compile(GrammarSpec("regex", f"[a-z]{{{n + 1}}}"))
    assert len(grammars._cache) == CACHED_GRAMMARS
    with pytest.raises(InvalidParams, match="at most 65536"):
        grammars.compile(GrammarSpec("regex", "a" * (MAX_SPEC_CHARS + 1)))
