"""`LoRAIndex`: which adapter row each token of one forward uses, built once per step on the host.

The stacked LoRA weights of a target have `2 * max_loras` rows: row `slot` holds the encoder side of
the adapter in `slot`, row `max_loras + slot` its decoder side. A token of a causal segment uses its
adapter's encoder row, a token of a bidirectional segment the decoder row; base tokens use none (-1).

Two views, since the self-conditioning MLP sees only the decoder tokens: `tokens` (all T tokens of the
batch, in order) and `decoder` (the T_dec decoder tokens, in order). Each has the runs of equal rows
as host tuples (for the torch reference, no device sync) and, on the device, per-token rows and the
run table (for the kernels and the experts), all brought over in one host-to-device copy.

Example, max_loras 2: segments [causal 3 tokens slot 1, bidirectional 4 tokens base, bidirectional 2
tokens slot 0] -> tokens: rows [1,1,1,-1,-1,-1,-1,2,2], runs ((0,3,1), (7,9,2)); decoder: rows
[-1,-1,-1,-1,2,2], runs ((4,6,2),).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.attention.types import Segment

Run = tuple[int, int, int]
"""(start, end, row): tokens [start, end) use stacked row `row`."""


@dataclass(frozen=True)
class LoRARuns:
    """One view's adapter rows. `rows` is empty when no token of the view uses an adapter."""

    runs: tuple[Run, ...]
    rows: frozenset[int]
    token_rows: Tensor
    """(N,) int32 on the device: each token's row, -1 for base tokens."""
    run_table: Tensor
    """(num_runs, 3) int32 on the device: start, end, row of every run."""
    max_run_len: int


@dataclass(frozen=True)
class LoRAIndex:
    """The adapter rows of one forward: every token, and the decoder tokens alone."""

    tokens: LoRARuns
    decoder: LoRARuns


def build_index(
    segments: Sequence[Segment], slots: Sequence[int | None], max_loras: int, device: torch.device
) -> LoRAIndex | None:
    """The index of a batch whose segment i uses the adapter in slot `slots[i]` (None: the base).

    None when no segment uses an adapter: the forward then runs the base model untouched.
    """
    if all(slot is None for slot in slots):
        return None
    rows = [_row(s, slot, max_loras) for s, slot in zip(segments, slots, strict=True)]
    sizes = [s.num_tokens for s in segments]
    decoder = [(n, r) for s, n, r in zip(segments, sizes, rows, strict=True) if not s.is_causal]
    all_runs = _runs(list(zip(sizes, rows, strict=True)))
    decoder_runs = _runs(decoder)
    token_rows = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int32), torch.tensor(sizes))
    decoder_rows = torch.repeat_interleave(
        torch.tensor([r for _, r in decoder], dtype=torch.int32),
        torch.tensor([n for n, _ in decoder], dtype=torch.long),
    )
    tables = [torch.tensor(runs, dtype=torch.int32).view(-1) for runs in (all_runs, decoder_runs)]
    packed = torch.cat([token_rows, decoder_rows, *tables]).to(device)  # the one host-to-device copy
    parts = torch.split(packed, [len(token_rows), len(decoder_rows), len(tables[0]), len(tables[1])])
    return LoRAIndex(_view(all_runs, parts[0], parts[2]), _view(decoder_runs, parts[1], parts[3]))


def _row(segment: Segment, slot: int | None, max_loras: int) -> int:
    if slot is None:
        return -1
    return slot if segment.is_causal else max_loras + slot


def _runs(sized_rows: list[tuple[int, int]]) -> list[Run]:
    """Runs of adapter rows over consecutive (num_tokens, row) pieces, equal neighbours merged."""
    runs: list[Run] = []
    start = 0
    for num_tokens, row in sized_rows:
        end = start + num_tokens
        if row >= 0 and num_tokens > 0:
            if runs and runs[-1][1] == start and runs[-1][2] == row:
                runs[-1] = (runs[-1][0], end, row)
            else:
                runs.append((start, end, row))
        start = end
    return runs


def _view(runs: list[Run], token_rows: Tensor, table: Tensor) -> LoRARuns:
    return LoRARuns(
        runs=tuple(runs),
        rows=frozenset(r for _, _, r in runs),
        token_rows=token_rows,
        run_table=table.view(-1, 3),
        max_run_len=max((end - start for start, end, _ in runs), default=0),
    )
