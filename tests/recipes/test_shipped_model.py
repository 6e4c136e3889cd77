"""The committed Sudoku checkpoint (models/sudoku): it loads in our engine and in transformers with matching
logits, its tokenizer and generation config load in transformers, and a plain completion solves an easy
puzzle. Nothing here trains: CI never retrains the shipped model.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, DynamicCache, GenerationConfig

from engine.generate import generate
from engine.model.loader import Checkpoint, load_checkpoint
from engine.request import SamplingParams
from engine.sampler import logits_for, soft_embedding
from recipes.sudoku import MODEL_DIR, tokens
from recipes.sudoku.dense_forward import lm_head
from recipes.sudoku.puzzles import consistent, from_string, is_valid_solution
from tests.recipes.helpers import paged_forward

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").is_file(),
    reason=f"the shipped checkpoint {MODEL_DIR} is absent (train it with recipes/sudoku/train.py)",
)

# Generated with recipes.sudoku.puzzles.make_puzzle (seed 5, 40 clues), not in the training pool.
EASY = "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3"


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_checkpoint(MODEL_DIR)


def test_engine_and_transformers_logits_match(checkpoint: Checkpoint) -> None:
    reference, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        MODEL_DIR, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference.eval()
    prompt = torch.tensor([tokens.prompt_ids(from_string(EASY))])  # (1, 82)
    canvas = torch.randint(
        0, tokens.VOCAB_SIZE, (1, tokens.CANVAS_LENGTH), generator=torch.Generator().manual_seed(0)
    )
    head = lm_head(checkpoint.model)
    with torch.no_grad():
        cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
        reference.model.encoder(input_ids=prompt, past_key_values=cache)
        expected = reference(decoder_input_ids=canvas, past_key_values=cache).logits[0]  # (C, V)
        ours = logits_for(paged_forward(checkpoint.model, prompt, canvas, None)[0], head)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
        processed = expected / 0.8  # a second step: self-conditioning on the first step's logits
        soft = soft_embedding(processed, head)[None]
        cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
        reference.model.encoder(input_ids=prompt, past_key_values=cache)
        expected = reference(
            decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=processed[None]
        ).logits[0]
        ours = logits_for(paged_forward(checkpoint.model, prompt, canvas, soft)[0], head)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_configs_and_tokenizer_load_in_transformers() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    assert tokenizer(EASY).input_ids == tokens.prompt_ids(from_string(EASY))
    generation = GenerationConfig.from_pretrained(str(MODEL_DIR))
    assert generation.max_new_tokens == tokens.CANVAS_LENGTH
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["canvas_length"] == tokens.CANVAS_LENGTH and config["text_config"]["vocab_size"] == 32


def test_completion_solves_an_easy_puzzle(checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer
    prompt = list(tokenizer(EASY).input_ids)
    params = [SamplingParams(seed=seed) for seed in range(3)]
    results = generate(checkpoint.model, checkpoint.defaults, [prompt] * 3, params, tokenizer=tokenizer)
    for result in results:
        assert result.finish_reason == "stop"
        grid = from_string(result.text)
        assert is_valid_solution(grid) and consistent(from_string(EASY), grid), result.text
