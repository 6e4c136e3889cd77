"""Quantised checkpoints through the Triton NVFP4 / W4A16 kernels (interpreted on CPU) vs the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kernels import dispatch
from engine.model.loader import load_checkpoint
from engine.quantization.convert import ConvertOptions, convert_checkpoint
from engine.quantization.methods import QuantExperts
from engine.quantization.weight_kernels import Nvfp4TritonKernel, W4A16TritonKernel
from tests.engine.checkpoints import save_reference
from tests.engine.model_harness import Harness, Part


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain")
    save_reference(path, moe_intermediate_size=32)
    return path


def run(path: Path, kernels: bool) -> tuple[list[torch.Tensor], type]:
    with dispatch.force(kernels):
        model = load_checkpoint(path, with_tokenizer=False).model
        harness = Harness(model)
        prompt, canvas = torch.arange(3, 12), torch.arange(20, 36)
        out = harness.run([Part("a", prompt, 0, True), Part("a", canvas, len(prompt), False)])
    experts = next(m.method for m in model.modules() if isinstance(getattr(m, "method", None), QuantExperts))
    return out, type(experts.kernel)


@pytest.mark.parametrize(
    ("fmt", "options", "kernel"),
    [
        ("nvfp4-modelopt", {}, Nvfp4TritonKernel),
        ("nvfp4-ct", {}, Nvfp4TritonKernel),
        ("w4a16", {"group_size": 16, "symmetric": False}, W4A16TritonKernel),
    ],
)
def test_triton_kernels_match_the_reference(
    fmt: str, options: dict[str, object], kernel: type, source: Path, tmp_path: Path
) -> None:
    dst = tmp_path / fmt
    convert_checkpoint(source, dst, ConvertOptions(fmt, **options))  # type: ignore[arg-type]
    got, got_kernel = run(dst, True)
    want, _ = run(dst, False)
    assert got_kernel is kernel
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)
