"""`x @ weight.T` through a weight prepacked once for oneDNN, for bf16 on the CPU.

`F.linear` on the CPU hands the weight to oneDNN in its stored (out, in) layout. For the tied LM head
(a [V, H] weight read by a few hundred rows a canvas) the prepacked weight is often much faster, with
bit-identical results, but not for every shape: on the 2-core Xeon (AMX), one canvas's head matmul
(256 rows) gained 1.3-1.4x at H 512-2048 with V up to 32,768, and nothing at V 131,072 or at the
released model's H 2,816 (bench/RESULTS.md, "The CPU's bf16 fast paths"). So `faster_packed` times
both at load and keeps the packed copy only where it is clearly faster: the copy costs the weight's
bytes again. fp32 is left out: prepacked it rounds differently from `F.linear`.

The packed tensor is oneDNN's opaque copy of the weight: only `packed_linear` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

BATCH_HINT = 256
"""The row count oneDNN picks the packed layout for, and `faster_packed` times: one canvas (the packed
weight serves any count)."""
MIN_GAIN = 1.1
"""`faster_packed` keeps the packed copy only when F.linear takes at least this many times as long."""
TIMED_CALLS = 5


def packs(weight: Tensor) -> bool:
    """True for a bf16 CPU weight where torch's oneDNN has bf16 support (AVX512-BF16 or AMX)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def pack_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed copy of `weight` (out, in); check `packs(weight)` first."""
    assert packs(weight), "pack only bf16 CPU weights on a oneDNN build with bf16 support"
    packed: Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
    return packed


def packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    """`F.linear(x, weight)` for the weight `packed` was made from: x (R, in) bf16 -> (R, out) bf16."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    return out


def faster_packed(weight: Tensor) -> Tensor | None:
    """The packed copy of `weight` where `packs(weight)` and one canvas's matmul through it is at least
    `MIN_GAIN` times faster than `F.linear` (and bit-identical) on this machine; None elsewhere."""
    if not packs(weight):
        return None
    packed = pack_weight(weight)
    x = torch.randn(BATCH_HINT, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    if not torch.equal(packed_linear(x, packed), F.linear(x, weight)):  # also the warm-up of both
        return None
    plain_s, packed_s = _fastest([lambda: F.linear(x, weight), lambda: packed_linear(x, packed)])
    return packed if keeps_packed(plain_s, packed_s) else None


def keeps_packed(plain_s: float, packed_s: float) -> bool:
    return plain_s >= MIN_GAIN * packed_s


def _fastest(calls: list[Callable[[], Tensor]]) -> list[float]:
    """Seconds of each call's fastest of `TIMED_CALLS` runs, the calls taking turns so that other load
    hits them alike (and only slows a run)."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(TIMED_CALLS):
        for call, runs in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            runs.append(time.perf_counter() - start)
    return [min(runs) for runs in times]
