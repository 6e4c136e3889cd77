"""The reference backend's batched decoder runs against attending each canvas on its own.

`TorchAttention` runs consecutive bidirectional segments of one length as one padded, masked SDPA
call (`DecoderRun`); `segment_attention` with `plan_segment` is the per-canvas definition it replaces.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention.reference import (
    DecoderRun,
    SegmentPlan,
    TorchAttention,
    plan_group,
    plan_segment,
    segment_attention,
)
from engine.attention.types import LayerCache, Segment
from tests.kernels.test_attention_kernel import clone, make_case

# A prompt chunk, then five canvases of 12 tokens with different cached lengths, then a lone canvas of
# another length: the five form one run (padded), the last stands alone.
LAYOUT = [
    (7, 0, True, 0),
    (12, 7, False, 0),
    (12, 30, False, 1),
    (12, 24, False, 2),
    (12, 33, False, 3),
    (12, 28, False, 4),
    (5, 10, False, 5),
]


def one_by_one(q, k, v, segments: list[Segment], cache: LayerCache) -> torch.Tensor:  # type: ignore[no-untyped-def]
    outputs, start = [], 0
    for segment in segments:
        end = start + segment.num_tokens
        plan = plan_segment(segment, cache)
        outputs.append(segment_attention(q[start:end], k[start:end], v[start:end], plan, cache))
        start = end
    return torch.cat(outputs)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_run_matches_each_canvas_alone(window: int | None, dtype: torch.dtype) -> None:
    q, k, v, segments, cache = make_case(LAYOUT, 4, 2, 16, 4, window, dtype, torch.device("cpu"))
    metadata = TorchAttention().prepare(segments, [cache])
    kinds = [type(p) for p in metadata["g"]]
    assert kinds == [SegmentPlan, DecoderRun, SegmentPlan], kinds
    run_cache, alone_cache = clone(cache), clone(cache)
    got = TorchAttention().forward(q, k, v, run_cache, metadata)
    expected = one_by_one(q, k, v, segments, alone_cache)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)
    assert torch.equal(run_cache.key, alone_cache.key) and torch.equal(run_cache.value, alone_cache.value)


def test_equal_canvases_run_unpadded_and_long_padding_is_not_batched() -> None:
    _, _, _, segments, cache = make_case(
        [(8, 40, False, 0), (8, 40, False, 1), (8, 2, False, 2)], 2, 1, 16, 4, None, torch.float32,
        torch.device("cpu"),
    )  # fmt: skip
    equal = plan_group(segments[:2], cache)
    assert len(equal) == 1 and isinstance(equal[0], DecoderRun) and equal[0].key_mask is None
    # Canvas 2 reads 2 cached keys against the others' 40: padding it would add far more than 25%.
    assert [type(p) for p in plan_group(segments, cache)] == [SegmentPlan] * 3


def test_canvases_with_nothing_cached_run_together() -> None:
    q, k, v, segments, cache = make_case(
        [(6, 0, False, 0), (6, 0, False, 1)], 2, 1, 16, 4, None, torch.float32, torch.device("cpu")
    )
    metadata = TorchAttention().prepare(segments, [cache])
    assert [type(p) for p in metadata["g"]] == [DecoderRun]
    got = TorchAttention().forward(q, k, v, clone(cache), metadata)
    torch.testing.assert_close(got, one_by_one(q, k, v, segments, clone(cache)), atol=1e-5, rtol=1e-5)
