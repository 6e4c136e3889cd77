"""The prepacked CPU matmul, and the LM head that uses it: bit-identical to `F.linear` where chosen."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import lm_head
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.kernels.packed_linear import faster_packed, keeps_packed, pack_weight, packed_linear, packs
from engine.llm import LLM
from engine.lm_head import LMHead, logits_for
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from tests.engine.checkpoints import save_servable

CPU_BF16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
needs_bf16 = pytest.mark.skipif(
    not CPU_BF16, reason="this CPU's oneDNN has no bf16 support: nothing is packed"
)


def weight(vocab: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(vocab)) * 0.05).to(dtype)


def test_packs_only_bf16_on_the_cpu() -> None:
    assert not packs(weight(64, 32, torch.float32))
    assert not packs(weight(64, 32, torch.float16))
    assert not packs(torch.zeros(4, dtype=torch.bfloat16))
    assert not packs(torch.zeros(64, 32, dtype=torch.bfloat16, device="meta"))
    assert packs(weight(64, 32, torch.bfloat16)) == CPU_BF16


@needs_bf16
@pytest.mark.parametrize(
    ("rows", "vocab", "hidden"), [(1, 64, 32), (82, 2048, 128), (256, 4096, 256), (300, 512, 96)]
)
def test_packed_linear_equals_linear(rows: int, vocab: int, hidden: int) -> None:
    """Any row count (the pack's hint is one canvas), bit for bit."""
    w = weight(vocab, hidden, torch.bfloat16)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows)).bfloat16()
    assert torch.equal(packed_linear(x, pack_weight(w)), F.linear(x, w))


@needs_bf16
def test_packed_linear_reads_a_row_slice() -> None:
    """The sampler hands it views (one canvas of a step's hidden states)."""
    w = weight(512, 64, torch.bfloat16)
    x = torch.randn(40, 64).bfloat16()
    assert torch.equal(packed_linear(x[10:30], pack_weight(w)), F.linear(x[10:30], w))
    assert torch.equal(packed_linear(x.t().contiguous().t(), pack_weight(w)), F.linear(x, w))


def test_keeps_the_packed_copy_only_when_clearly_faster() -> None:
    assert keeps_packed(plain_s=2.0, packed_s=1.0)
    assert keeps_packed(plain_s=1.1, packed_s=1.0)
    assert not keeps_packed(plain_s=1.05, packed_s=1.0)
    assert not keeps_packed(plain_s=1.0, packed_s=2.0)


def test_faster_packed_is_none_or_an_equal_matmul() -> None:
    assert faster_packed(weight(4096, 128, torch.float32)) is None
    w = weight(8192, 256, torch.bfloat16)
    packed = faster_packed(w)
    assert packed is None or CPU_BF16
    if packed is not None:
        x = torch.randn(100, 256).bfloat16()
        assert torch.equal(packed_linear(x, packed), F.linear(x, w))


@needs_bf16
def test_a_prepacked_head_projects_as_the_plain_head() -> None:
    head = LMHead.tied(weight(4096, 128, torch.bfloat16), softcap=30.0)
    packed = replace(head, packed=pack_weight(head.weight))
    assert packed.prepacked() is packed
    hidden = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(logits_for(hidden, packed), logits_for(hidden, head))


def test_an_fp32_head_is_never_packed() -> None:
    head = LMHead.tied(weight(256, 32, torch.float32), softcap=30.0)
    assert head.prepacked() is head and head.packed is None


@needs_bf16
def test_the_engine_serves_through_the_head_prepacked_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner asks `LMHead.prepacked` (patched here to always pack: the real choice is timed)."""
    monkeypatch.setattr(lm_head, "faster_packed", pack_weight)
    checkpoint = load_checkpoint(save_servable(tmp_path), dtype=torch.bfloat16)
    engine = Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, EngineConfig())
    assert engine.runner.head.packed is not None
    assert engine.runner.head.weight is checkpoint.model.embed_tokens.weight
    monkeypatch.setattr(lm_head, "faster_packed", lambda weight: None)
    plain = Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, EngineConfig())
    assert plain.runner.head.packed is None
    params = SamplingParams(max_tokens=16, max_denoising_steps=3, seed=1, stop_token_ids=())
    (got,) = LLM(engine).generate([[2, 5, 6, 7]], params)
    (expected,) = LLM(plain).generate([[2, 5, 6, 7]], params)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == 16
