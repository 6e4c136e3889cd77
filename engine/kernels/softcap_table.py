"""The LM head's soft-cap of bf16 raw logits as one table lookup, for the compiled CPU engine.

The reference computes `cap * tanh(raw.float() / cap)` on bf16 raw logits: three fp32 passes (divide,
tanh, multiply) after the cast, over a [C, V] tile per canvas (32 MiB of fp32 for the bench model's
256 x 32,768). A bf16 value has only 65,536 bit patterns, so the soft-cap of every one of them fits a
256 KiB fp32 table, computed once by the very same ops (`build_table`): the lookup gives the
reference's bits for every input, NaN and infinities included, by construction.

The lookup `table[bits + 32768]` runs as one compiled loop (inductor fuses the bit view, the index and
the gather; it needs the C++ compiler `--compile` already needs): read 2 bytes, write 4, no tanh.
On the 2-core Xeon one canvas's tile took 1.8 ms against 3.5 ms for the reference's ops
(bench/RESULTS.md, "Compiled bf16 on the CPU"). Whole canvases only: in the sampler's loop over small
row tiles the lookup measured no faster, so the sampler keeps the ops (`engine.lm_head.tempered_logits`).

Eager torch has no cheap form of this gather (advanced indexing with int64 indices took 24 ms a tile),
so the table is used only where the engine compiles (`LMHead.with_table`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

NUM_BF16_PATTERNS = 1 << 16
OFFSET = 1 << 15
"""bf16 bits read as int16 run over [-32768, 32767]; + OFFSET is the table row: 0x0000 (+0.0) -> 32768,
0x8000 (-0.0) -> 0, 0x7F80 (+inf) -> 65408."""


def every_bf16() -> Tensor:
    """All 65,536 bf16 values, in table order (row i holds the value whose int16 bits are i - OFFSET)."""
    bits = torch.arange(-OFFSET, NUM_BF16_PATTERNS - OFFSET, dtype=torch.int32).to(torch.int16)
    return bits.view(torch.bfloat16)  # [65536]


def build_table(cap: float) -> Tensor:
    """[65536] fp32: the reference's soft-cap of every bf16 value, by the reference's own ops."""
    logits = every_bf16().to(torch.float32)
    return logits.div_(cap).tanh_().mul_(cap)


def _lookup(raw: Tensor, table: Tensor) -> Tensor:
    return table[raw.view(torch.int16).to(torch.int32) + OFFSET]


@functools.cache
def _compiled_lookup() -> Callable[[Tensor, Tensor], Tensor]:
    """`_lookup` through inductor, built on first use (importing this module does not import dynamo)."""
    compiled: Callable[[Tensor, Tensor], Tensor] = torch.compile(_lookup, dynamic=True)
    return compiled


def table_softcap(raw: Tensor, table: Tensor) -> Tensor:
    """`table[raw's bits]`: [R, V] bf16 -> [R, V] fp32; with `build_table(cap)` bit for bit the
    reference's `cap * tanh(raw.float() / cap)`."""
    assert raw.dtype == torch.bfloat16 and table.shape == (NUM_BF16_PATTERNS,), "bf16 raw logits only"
    return _compiled_lookup()(raw, table)  # [R, V] fp32
