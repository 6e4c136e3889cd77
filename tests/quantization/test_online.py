"""`--quantization` as vLLM spells it: detected by default, fp8 / int8 quantise a plain checkpoint at
load, and a mismatch with the checkpoint is a clear error (through the loader, Settings and the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine.async_engine import AsyncEngine
from engine.model.loader import CheckpointError, load_checkpoint
from engine.quantization.convert import ConvertOptions, convert_checkpoint
from engine.quantization.methods import QuantExperts, QuantLinear, resident_bytes
from engine.quantization.reference import dequantize
from engine.quantization.weight_kernels import Int8CpuKernel, ReferenceKernel
from service.cli import build_parser, settings_from
from service.model_setup import SetupError, build_service
from service.settings import Settings
from tests.engine.checkpoints import save_servable
from tests.engine.model_harness import Harness, Part


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_servable(tmp_path_factory.mktemp("plain"))


def quantised_methods(model: nn.Module) -> dict[str, object]:
    return {
        name: m.method
        for name, m in model.named_modules()
        if isinstance(getattr(m, "method", None), QuantLinear | QuantExperts)
    }


def logits(model: nn.Module) -> torch.Tensor:
    harness = Harness(model)  # type: ignore[arg-type]
    prompt, canvas = torch.arange(3, 13), torch.arange(40, 56)
    return harness.run([Part("a", prompt, 0, True), Part("a", canvas, len(prompt), False)])[0]


@pytest.mark.parametrize(
    ("kind", "kernel", "bytes_per_weight"), [("int8", Int8CpuKernel, 1), ("fp8", ReferenceKernel, 1)]
)
def test_quantise_at_load(plain: Path, kind: str, kernel: type, bytes_per_weight: int) -> None:
    model = load_checkpoint(plain, with_tokenizer=False, quantization=kind).model
    reference = load_checkpoint(plain, with_tokenizer=False).model
    assert resident_bytes(model) < 0.5 * resident_bytes(reference)
    methods = quantised_methods(model)
    assert "layers.0.self_attn.q_proj" in methods and "layers.3.experts" in methods
    assert "layers.0.router.proj" not in methods and not any("self_conditioning" in n for n in methods)
    assert all(type(m.kernel) is kernel for m in methods.values())  # type: ignore[attr-defined]
    experts = model.get_submodule("layers.1.experts")
    assert experts.get_buffer("gate_up_weight").element_size() == bytes_per_weight
    for name, method in methods.items():  # the plain model with the quantised weights, dequantised
        module = model.get_submodule(name)
        fmt = method.fmt  # type: ignore[attr-defined]
        parts = ("gate_up", "down") if name.endswith("experts") else ("",)
        for part in parts:
            prefix = f"{part}_" if part else ""
            stored = {s: module.get_buffer(prefix + s) for s in ("weight", "weight_scale")}
            target = f"{part}_proj" if part else "weight"
            weight = dequantize(fmt, stored, 0, torch.float32)
            reference.get_submodule(name).register_parameter(
                target, nn.Parameter(weight, requires_grad=False)
            )
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-4, rtol=0)


def test_a_mismatch_with_the_checkpoint_is_refused(plain: Path, tmp_path: Path) -> None:
    w4a16 = tmp_path / "w4a16"
    convert_checkpoint(plain, w4a16, ConvertOptions("w4a16", group_size=8))
    with pytest.raises(CheckpointError, match="--quantization fp8 does not match the checkpoint"):
        load_checkpoint(w4a16, with_tokenizer=False, quantization="fp8")
    load_checkpoint(w4a16, with_tokenizer=False, quantization="compressed-tensors")  # its own: fine
    with pytest.raises(CheckpointError, match="this checkpoint is plain"):
        load_checkpoint(plain, with_tokenizer=False, quantization="modelopt")
    with pytest.raises(CheckpointError, match="'awq' is not supported"):
        load_checkpoint(plain, with_tokenizer=False, quantization="awq")


def test_the_flag_reaches_the_model_through_settings(plain: Path) -> None:
    # The engine in a thread of this process, so the test can look at its model.
    flags = ["--quantization", "int8", "--device", "cpu", "--no-engine-process"]
    settings = settings_from(build_parser().parse_args(["serve", str(plain), *flags]))
    assert settings.quantization == "int8"
    service, _ = build_service(settings)
    assert isinstance(service.engine, AsyncEngine)
    assert quantised_methods(service.engine.engine.model)
    with pytest.raises(SetupError, match="needs a checkpoint stored in that format"):
        build_service(
            Settings(model=plain, device="cpu", quantization="compressed-tensors", engine_process=False)
        )


def test_the_cli_refuses_an_unknown_quantization(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err
