"""Loading quantised checkpoints: every format exact against its dequantised weights, stored quantised,
and every broken checkpoint refused with a CheckpointError naming the tensor, scheme or width at fault.

The quantised checkpoints are written by `engine.quantization.convert` (bit-identical to
llm-compressor's output, tests/quantization/test_convert.py). The plain fp32 twin of each is made
independently of the loader: every stored linear of the converted file is dequantised with
`engine.quantization.reference.dequantize` and per-expert weights are fused back into
`experts.gate_up_proj` / `down_proj`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.model.loader import CheckpointError, load_checkpoint
from engine.quantization.convert import ConvertOptions, convert_checkpoint
from engine.quantization.methods import QuantExperts, QuantLinear, resident_bytes
from engine.quantization.parse import parse_quantization_config
from engine.quantization.reference import dequantize
from engine.quantization.weight_kernels import Int4CpuKernel, ReferenceKernel
from tests.engine.checkpoints import rewrite_json, save_reference
from tests.engine.model_harness import Harness, Part

INTER = 32
FORMATS: dict[str, dict[str, Any]] = {
    "fp8": {},
    "w4a16": {"group_size": 16},
    "w4a16-asym": {"group_size": 32, "symmetric": False},
    "nvfp4-ct": {},
    "nvfp4-modelopt": {},
}
_EXPERT = re.compile(r"^(model\.decoder\.layers\.\d+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain")
    save_reference(path, moe_intermediate_size=INTER)
    return path


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, options in FORMATS.items():
        dst = tmp_path_factory.mktemp("q") / name
        convert_checkpoint(source, dst, ConvertOptions(name.removesuffix("-asym"), **options))
        out[name] = dst
    return out


def dequantized_twin(quantised: Path, dst: Path) -> Path:
    """The quantised checkpoint with every stored weight dequantised to fp32, as a plain checkpoint."""
    config = json.loads((quantised / "config.json").read_text())
    scheme = parse_quantization_config(config.pop("quantization_config"))
    tensors = load_file(quantised / "model.safetensors")
    modules: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, suffix = name.rpartition(".")
        if name.startswith("model.decoder.") and scheme.format_for(module) is not None:
            modules.setdefault(module, {})[suffix] = tensor
    modules = {m: stored for m, stored in modules.items() if "weight_scale" in stored}  # the quantised ones
    plain = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in modules}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for module, stored in modules.items():
        fmt = scheme.format_for(module)
        assert fmt is not None
        width = _width(stored)
        weight = dequantize(fmt, stored, width, torch.float32)
        if match := _EXPERT.match(module + ".weight"):
            experts.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = weight
        else:
            plain[module + ".weight"] = weight
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        plain[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]]) for e in order]
        )
        plain[f"{prefix}.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in order])
    dst.mkdir()
    save_file(
        {n: t.contiguous() for n, t in plain.items()}, dst / "model.safetensors", metadata={"format": "pt"}
    )
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _width(stored: dict[str, Tensor]) -> int:
    if "weight_shape" in stored:
        return int(stored["weight_shape"][1])
    packed = stored["weight_packed"] if "weight_packed" in stored else stored["weight"]
    return int(packed.shape[1]) * (2 if packed.dtype == torch.uint8 else 1)


def logits(path: Path, **kwargs: Any) -> list[Tensor]:
    model = load_checkpoint(path, with_tokenizer=False, **kwargs).model
    harness = Harness(model)
    prompt = torch.tensor([5, 17, 3, 99, 42, 8, 1, 64, 23, 7])
    canvas = torch.tensor([2, 2, 9, 2, 31, 2, 2, 2, 4, 2, 2, 2, 2, 77, 2, 2])
    return harness.run(
        [Part("a", prompt, 0, True), Part("a", canvas, len(prompt), False), Part("b", canvas[:8], 0, False)]
    )


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantised_logits_equal_the_dequantised_checkpoints(
    fmt: str, converted: dict[str, Path], tmp_path: Path
) -> None:
    twin = dequantized_twin(converted[fmt], tmp_path / "twin")
    got, want = logits(converted[fmt]), logits(twin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the decoder tensors the engine serves (the encoder aliases and vision are skipped)."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = [n for n in f.keys() if n.startswith("model.decoder.")]  # noqa: SIM118
        return sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weights_stay_quantised_in_memory(fmt: str, converted: dict[str, Path]) -> None:
    model = load_checkpoint(converted[fmt], with_tokenizer=False).model
    methods = [m.method for m in model.modules() if hasattr(m, "method")]
    assert any(isinstance(m, QuantExperts) for m in methods)
    quantised = [m for m in methods if isinstance(m, QuantLinear | QuantExperts)]
    assert quantised and all(isinstance(m.kernel, ReferenceKernel) for m in quantised)
    rope = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "inv_freq" in n)
    stored = checkpoint_bytes(converted[fmt])
    assert abs(resident_bytes(model) - rope - stored) <= 0.05 * stored


def test_int4_cpu_path_is_taken_where_it_costs_little(converted: dict[str, Path], tmp_path: Path) -> None:
    """W4A16 group 32 in fp32: the repacked scales cost more than 5%, so the reference path is kept;
    a kernel allowed the extra bytes repacks and computes the same logits."""
    kernel = Int4CpuKernel(
        parse_quantization_config(_qconfig(converted["w4a16-asym"])).groups[0].format, torch.float32
    )
    assert kernel.repack_overhead(torch.float32) > 0.05
    assert Int4CpuKernel(kernel.fmt, torch.bfloat16).repack_overhead(torch.bfloat16) > 0
    for group, dtype, fits in ((128, torch.bfloat16, True), (32, torch.bfloat16, False)):
        fmt = kernel.fmt.__class__(kernel.fmt.weight, group, True)
        assert (Int4CpuKernel(fmt, dtype).repack_overhead(torch.bfloat16) <= 0.05) is fits


def _qconfig(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((path / "config.json").read_text())["quantization_config"]
    return config


# --- broken checkpoints ----------------------------------------------------------------------------


def broken(converted: Path, tmp_path: Path, edit: Any) -> Path:
    path = Path(shutil.copytree(converted, tmp_path / "broken"))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "edited.safetensors", metadata={"format": "pt"})
    (path / "edited.safetensors").replace(path / "model.safetensors")
    return path


def load_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, with_tokenizer=False, **kwargs)
    return str(info.value)


def test_missing_expert_tensor_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    name = "model.decoder.layers.2.experts.3.up_proj.weight_scale"
    path = broken(converted["fp8"], tmp_path, lambda t: t.pop(name))
    assert f"missing tensor {name}" in load_error(path)


def test_unused_expert_tensor_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    extra = "model.decoder.layers.1.experts.4.gate_proj.weight"  # the model has 4 experts: 0..3

    def add(t: dict[str, Tensor]) -> None:
        t[extra] = t["model.decoder.layers.1.experts.0.gate_proj.weight"].clone()

    message = load_error(broken(converted["fp8"], tmp_path, add))
    assert extra in message and "not used" in message


def test_unexpected_suffix_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    extra = "model.decoder.layers.0.experts.1.down_proj.weight_zero_point"

    def add(t: dict[str, Tensor]) -> None:
        t[extra] = torch.zeros(8, 2, dtype=torch.int32)

    assert extra in load_error(broken(converted["w4a16"], tmp_path, add))


def test_missing_linear_tensor_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    name = "model.decoder.layers.1.self_attn.q_proj.weight_scale"
    path = broken(converted["w4a16"], tmp_path, lambda t: t.pop(name))
    assert name in load_error(path)


def test_unknown_scheme_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(converted["fp8"], tmp_path / "bad"))
    rewrite_json(path / "config.json", lambda d: d["quantization_config"].update(quant_method="awq"))
    assert "'awq'" in load_error(path)

    def marlin(data: dict[str, Any]) -> None:
        data["quantization_config"].update(quant_method="compressed-tensors")
        data["quantization_config"]["config_groups"]["group_0"]["format"] = "marlin-24"

    rewrite_json(path / "config.json", marlin)
    assert "marlin-24" in load_error(path)


def test_group_size_that_does_not_divide_a_width_is_refused(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    path = Path(shutil.copytree(converted["w4a16"], tmp_path / "bad"))

    def group_64(data: dict[str, Any]) -> None:
        data["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64

    rewrite_json(path / "config.json", group_64)
    message = load_error(path)
    assert "group_size 64 does not divide" in message and "32" in message


def test_kv_cache_scales_are_read_past(converted: dict[str, Path], tmp_path: Path) -> None:
    def add(t: dict[str, Tensor]) -> None:
        for i in range(4):
            t[f"model.decoder.layers.{i}.self_attn.k_scale"] = torch.tensor(1.0)
            t[f"model.decoder.layers.{i}.self_attn.v_scale"] = torch.tensor(1.0)

    path = broken(converted["fp8"], tmp_path, add)
    assert "k_scale" in load_error(path)  # without a kv_cache_scheme they are unused tensors
    rewrite_json(
        path / "config.json",
        lambda d: d["quantization_config"].update(
            kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
        ),
    )
    load_checkpoint(path, with_tokenizer=False)


def test_encoder_duplicates_are_skipped_and_its_layer_scalar_kept(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    """llm-compressor stores `model.encoder.language_model.*` copies of the decoder's linears."""

    def add(t: dict[str, Tensor]) -> None:
        for name in list(t):
            if name.startswith("model.decoder.layers.0.self_attn.q_proj."):
                t[name.replace("model.decoder.", "model.encoder.language_model.")] = t[name].clone()

    path = broken(converted["fp8"], tmp_path, add)
    model = load_checkpoint(path, with_tokenizer=False).model
    reference = load_checkpoint(converted["fp8"], with_tokenizer=False).model
    assert torch.equal(model.layers[0].encoder_layer_scalar, reference.layers[0].encoder_layer_scalar)
