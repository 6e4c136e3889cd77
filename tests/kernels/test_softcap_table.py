"""The soft-cap as a table lookup: the reference's bits for every bf16 input, with and without the
sampler's temperature, and the heads that use it.

The lookup is compiled by inductor (C++ on the CPU), so the first test pays a few seconds of it.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.softcap_table import NUM_BF16_PATTERNS, OFFSET, build_table, every_bf16, table_softcap
from engine.lm_head import LMHead, softcap, tempered_logits

CAP = 30.0


def reference_softcap(raw: torch.Tensor, cap: float = CAP) -> torch.Tensor:
    """The reference's order of ops: cast, divide, tanh, multiply."""
    return torch.tanh(raw.float() / cap) * cap


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    same_dtype = got.dtype == want.dtype == torch.float32
    return same_dtype and torch.equal(got.view(torch.int32), want.view(torch.int32))


def raw_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """bf16 raw logits over the soft-cap's whole range, with the special values in the first row."""
    raw = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 40).to(torch.bfloat16)
    specials = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -3e38, 0.5, -29.75]
    count = min(len(specials), vocab)
    raw[0, :count] = torch.tensor(specials[:count], dtype=torch.bfloat16)
    return raw


def test_the_table_is_indexed_by_the_values_bits() -> None:
    values = every_bf16()
    assert values.shape == (NUM_BF16_PATTERNS,) and values.dtype == torch.bfloat16
    bits = values.view(torch.int16).to(torch.int32) + OFFSET
    assert torch.equal(bits, torch.arange(NUM_BF16_PATTERNS, dtype=torch.int32))  # row i: bits i - OFFSET
    table = build_table(CAP)
    assert same_bits(table[~values.isnan()], reference_softcap(values[~values.isnan()]))
    assert table[values.isnan()].isnan().all()
    assert table[OFFSET] == 0.0 and table[0] == 0.0 and table[0].signbit()  # +0.0 and -0.0
    assert table[0x7F80 + OFFSET] == CAP  # +inf


@pytest.mark.parametrize("shape", [(1, 7), (37, 1000), (256, 384)])
def test_the_lookup_gives_the_reference_bits(shape: tuple[int, int]) -> None:
    raw = raw_logits(*shape, seed=shape[0])
    got = table_softcap(raw, build_table(CAP))
    want = reference_softcap(raw)
    assert same_bits(got[~want.isnan()], want[~want.isnan()])
    assert torch.equal(got.isnan(), want.isnan())


def test_the_samplers_tempered_logits_keep_the_reference_bits_beside_a_table() -> None:
    """The sampler's row tiles take the ops, not the table; both give the reference's bits."""
    raw = raw_logits(12, 500, seed=1)
    head = LMHead.tied(torch.zeros(500, 4).bfloat16(), CAP).with_table()
    per_row = torch.linspace(0.4, 1.2, 12)[:, None]  # [R, 1]: one temperature per canvas row
    for temperature in (per_row, torch.tensor(0.7)):
        got = tempered_logits(raw, head, temperature)
        want = reference_softcap(raw).div_(temperature)
        finite = ~want.isnan()
        assert same_bits(got[finite], want[finite])
        assert same_bits(softcap(raw, head).div_(temperature)[finite], want[finite])


def test_only_bf16_heads_on_the_cpu_get_a_table() -> None:
    weight = torch.randn(64, 16)
    fp32 = LMHead.tied(weight, CAP)
    assert fp32.with_table() is fp32
    uncapped = LMHead.tied(weight.bfloat16(), None)
    assert uncapped.with_table() is uncapped
    head = LMHead.tied(weight.bfloat16(), CAP).with_table()
    assert head.table is not None and head.with_table() is head


def test_a_head_with_a_table_gives_the_same_logits() -> None:
    plain = LMHead.tied(torch.randn(300, 16).bfloat16(), CAP)
    tabled = plain.with_table()
    raw = raw_logits(20, 300, seed=2)
    temperature = torch.full((20, 1), 0.8)
    finite = ~reference_softcap(raw).isnan()
    assert same_bits(softcap(raw, tabled)[finite], softcap(raw, plain)[finite])
    want = tempered_logits(raw, plain, temperature)
    assert same_bits(tempered_logits(raw, tabled, temperature)[finite], want[finite])
