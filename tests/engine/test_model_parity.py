"""Our forward pass against transformers' DiffusionGemmaForBlockDiffusion on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion

from engine.attention.reference import read_kv
from engine.model.loader import load_checkpoint
from tests.engine.checkpoints import CANVAS, VOCAB, WINDOW, save_reference
from tests.engine.model_harness import Harness, Part, Reference

FP32_TOL = 1e-4
PROMPT_LEN = 11  # longer than the sliding window (8): exercises window trimming


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiffusionGemmaForBlockDiffusion]:
    path = tmp_path_factory.mktemp("tiny")
    return path, save_reference(path)


def tokens(n: int, seed: int) -> Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def ours(path: Path, dtype: torch.dtype = torch.float32, block_size: int = 4) -> Harness:
    return Harness(load_checkpoint(path, dtype=dtype, with_tokenizer=False).model, block_size=block_size)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_encoder_prefill_fills_the_cache_like_the_reference(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion],
) -> None:
    path, model = checkpoint
    harness, ref = ours(path), Reference(model)
    prompt = tokens(PROMPT_LEN, 1)
    harness.run([Part("a", prompt, 0, True)])
    ref.encode(prompt, 0)
    table = harness.table("a", PROMPT_LEN)
    for i, (cache, ref_layer) in enumerate(zip(harness.caches, ref.cache.layers, strict=True)):
        kept = ref_layer.keys.shape[2]  # sliding layers keep only the last WINDOW - 1 positions
        assert kept == (WINDOW - 1 if cache.window else PROMPT_LEN), i
        key, value = read_kv(cache, table[cache.group], PROMPT_LEN - kept, PROMPT_LEN)
        assert max_diff(key, ref_layer.keys[0].transpose(0, 1)) < FP32_TOL, f"layer {i} keys"
        assert max_diff(value, ref_layer.values[0].transpose(0, 1)) < FP32_TOL, f"layer {i} values"


def test_decoder_step_without_and_with_self_conditioning(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion],
) -> None:
    path, model = checkpoint
    harness, ref = ours(path), Reference(model)
    prompt, canvas = tokens(PROMPT_LEN, 2), tokens(CANVAS, 3)
    ref.encode(prompt, 0)
    (first,) = harness.run([Part("a", prompt, 0, True), Part("a", canvas, PROMPT_LEN, False)])
    expected_first = ref.decode(canvas)
    assert max_diff(first, expected_first) < FP32_TOL

    processed = expected_first / 0.7  # temperature-processed logits feed the next step
    canvas2 = tokens(CANVAS, 4)
    (second,) = harness.run([Part("a", canvas2, PROMPT_LEN, False, harness.soft(processed))])
    expected_second = ref.decode(canvas2, processed)
    assert max_diff(second, expected_second) < FP32_TOL
    assert max_diff(second, ref.decode(canvas2)) > 100 * FP32_TOL  # self-conditioning matters


def test_commit_then_next_block(checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion]) -> None:
    path, model = checkpoint
    harness, ref = ours(path), Reference(model)
    prompt, committed, canvas = tokens(PROMPT_LEN, 5), tokens(CANVAS, 6), tokens(CANVAS, 7)
    ref.encode(prompt, 0)
    ref.encode(committed, PROMPT_LEN)
    harness.run([Part("a", prompt, 0, True)])
    harness.run([Part("a", committed, PROMPT_LEN, True)])
    (logits,) = harness.run([Part("a", canvas, PROMPT_LEN + CANVAS, False)])
    assert max_diff(logits, ref.decode(canvas)) < FP32_TOL


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = save_reference(tmp_path, seed=3, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    harness, ref = ours(tmp_path), Reference(model)
    prompt, canvas = tokens(PROMPT_LEN, 8), tokens(CANVAS, 9)
    ref.encode(prompt, 0)
    (logits,) = harness.run([Part("a", prompt, 0, True), Part("a", canvas, PROMPT_LEN, False)])
    assert max_diff(logits, ref.decode(canvas)) < FP32_TOL


def test_bf16_is_as_close_to_the_reference_as_bf16_itself(
    checkpoint: tuple[Path, DiffusionGemmaForBlockDiffusion],
) -> None:
    """bf16 keeps 8 mantissa bits, so each op may round by ~0.4%; the reference in bf16 drifts from
    fp32 by that much. Ours in bf16 must be no further from the reference in bf16 than twice that drift
    (plus 0.05 absolute on logits of order 1), i.e. we add no error beyond bf16 rounding order."""
    path, model = checkpoint
    prompt, canvas = tokens(PROMPT_LEN, 10), tokens(CANVAS, 11)
    ref32 = Reference(model)
    ref32.encode(prompt, 0)
    expected32 = ref32.decode(canvas)
    ref16 = Reference(DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval())
    ref16.encode(prompt, 0)
    expected16 = ref16.decode(canvas)
    harness = ours(path, dtype=torch.bfloat16)
    (logits,) = harness.run([Part("a", prompt, 0, True), Part("a", canvas, PROMPT_LEN, False)])
    drift = max_diff(expected16, expected32)
    assert max_diff(logits, expected16) <= 2 * drift + 0.05
    assert max_diff(logits, expected32) <= 3 * drift + 0.05
