"""The checkpoint converter: the published layouts, bit for bit what llm-compressor writes.

`data/llmcompressor_manifest.json` lists the dtype, shape and SHA-256 of every decoder tensor that
llm-compressor 0.14's data-free `oneshot` wrote for `save_reference(moe_intermediate_size=32)` in each
scheme (data/README.md says how it was made); the converter must write the same tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.quantization.convert import ConvertError, ConvertOptions, convert_checkpoint, main
from engine.quantization.layout import linear_tensors
from engine.quantization.nvfp4 import dequantize_nvfp4_modelopt
from engine.quantization.parse import parse_quantization_config
from engine.quantization.scheme import LinearFormat, WeightFormat
from engine.quantization.w4a16 import dequantize_w4a16
from tests.engine.checkpoints import save_reference, save_tokenizer

DATA = Path(__file__).parent / "data"
MANIFEST: dict[str, dict[str, list[Any]]] = json.loads((DATA / "llmcompressor_manifest.json").read_text())
TOOL_CONFIGS: dict[str, Any] = json.loads((DATA / "llmcompressor_configs.json").read_text())
EXPERTS = 4
INTER = 32
HIDDEN = 64


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain")
    save_reference(path, moe_intermediate_size=INTER)
    save_tokenizer(path)
    return path


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[
        :16
    ]


def manifest(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {
        name: [str(t.dtype).removeprefix("torch."), list(t.shape), digest(t)]
        for name, t in sorted(tensors.items())
        if name.startswith("model.decoder.")
    }


def convert(
    source: Path, dst: Path, fmt: str, **options: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    convert_checkpoint(source, dst, ConvertOptions(fmt, **options))
    return load_file(str(dst / "model.safetensors")), json.loads((dst / "config.json").read_text())


def test_source_is_the_manifests(source: Path) -> None:
    """The tiny model is rebuilt deterministically; if this fails, regenerate data/ (README.md)."""
    assert manifest(load_file(str(source / "model.safetensors"))) == MANIFEST["source"]


@pytest.mark.parametrize(
    ("tool", "fmt", "options"),
    [
        ("FP8_DYNAMIC", "fp8", {}),
        ("W4A16", "w4a16", {"group_size": 32}),
        ("W4A16_ASYM", "w4a16", {"group_size": 32, "symmetric": False}),
        ("NVFP4A16", "nvfp4-ct", {}),
    ],
)
def test_matches_llmcompressor(
    source: Path, tmp_path: Path, tool: str, fmt: str, options: dict[str, Any]
) -> None:
    tensors, config = convert(source, tmp_path / fmt, fmt, **options)
    ours, theirs = manifest(tensors), MANIFEST[tool]
    assert sorted(set(ours) ^ set(theirs)) == []
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    quantization = config["quantization_config"]
    expected = TOOL_CONFIGS[tool]
    assert {k: v for k, v in quantization.items() if k != "ignore"} == {
        k: v for k, v in expected.items() if k not in ("ignore", "version")
    }
    assert sorted(quantization["ignore"]) == sorted(expected["ignore"])


def test_fp8_layout_matches_the_published_checkpoint(source: Path, tmp_path: Path) -> None:
    """A bf16 model gets BF16 scales (as RedHatAI's FP8-dynamic); non-quantised tensors are copied."""
    plain = load_file(str(source / "model.safetensors"))
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for path in source.iterdir():
        if path.name != "model.safetensors":
            (bf16 / path.name).write_bytes(path.read_bytes())
    save_file({k: v.bfloat16() for k, v in plain.items()}, str(bf16 / "model.safetensors"))
    tensors, _ = convert(bf16, tmp_path / "fp8", "fp8")
    expert = "model.decoder.layers.2.experts.3"
    assert tensors[f"{expert}.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{expert}.gate_proj.weight_scale"].dtype == torch.bfloat16
    assert tuple(tensors[f"{expert}.down_proj.weight_scale"].shape) == (HIDDEN, 1)
    assert torch.equal(
        tensors["model.decoder.layers.2.router.proj.weight"],
        plain["model.decoder.layers.2.router.proj.weight"].bfloat16(),
    )
    assert "model.decoder.layers.2.experts.gate_up_proj" not in tensors


def test_modelopt_nvfp4_quantises_only_the_experts(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "modelopt"
    tensors, config = convert(source, dst, "nvfp4-modelopt")
    plain = load_file(str(source / "model.safetensors"))
    scheme = parse_quantization_config(config["quantization_config"])
    assert scheme.quant_method == "modelopt"
    assert json.loads((dst / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    fmt = LinearFormat(WeightFormat.NVFP4_MODELOPT, 16)
    for layer in range(4):
        prefix = f"model.decoder.layers.{layer}.experts"
        gate_up, down = plain[f"{prefix}.gate_up_proj"], plain[f"{prefix}.down_proj"]
        for e in range(EXPERTS):
            for proj, weight in (
                ("gate_proj", gate_up[e, :INTER]),
                ("up_proj", gate_up[e, INTER:]),
                ("down_proj", down[e]),
            ):
                module = f"{prefix}.{e}.{proj}"
                specs = linear_tensors(fmt, *weight.shape)
                stored = {suffix: tensors.pop(f"{module}.{suffix}") for suffix in specs}
                assert all(specs[s].accepts(t) for s, t in stored.items()), module
                back = dequantize_nvfp4_modelopt(
                    stored["weight"], stored["weight_scale"], stored["weight_scale_2"], torch.float32
                )
                assert (back - weight).abs().max() <= weight.abs().max() / 6, module  # within one e2m1 step
    assert set(tensors) == set(plain) - {
        n for n in plain if n.endswith(("gate_up_proj", "experts.down_proj"))
    }
    assert all(torch.equal(tensors[name], plain[name]) for name in tensors)


def test_gate_and_up_share_the_global_scale(source: Path, tmp_path: Path) -> None:
    tensors, _ = convert(source, tmp_path / "modelopt", "nvfp4-modelopt")
    expert = "model.decoder.layers.1.experts.2"
    assert torch.equal(
        tensors[f"{expert}.gate_proj.weight_scale_2"], tensors[f"{expert}.up_proj.weight_scale_2"]
    )


def test_w4a16_round_trip_and_sharding(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "sharded"
    convert_checkpoint(source, dst, ConvertOptions("w4a16", group_size=16, max_shard_bytes=100_000))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors |= load_file(str(dst / shard))
    assert set(tensors) == set(index["weight_map"])
    plain = load_file(str(source / "model.safetensors"))
    down = plain["model.decoder.layers.3.experts.down_proj"][1]
    module = "model.decoder.layers.3.experts.1.down_proj"
    back = dequantize_w4a16(
        tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"], None, INTER, torch.float32
    )
    assert (back - down).abs().max() <= tensors[f"{module}.weight_scale"].max() / 2 + 1e-7
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()


def test_group_size_that_does_not_divide_a_width_is_refused(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([str(source), str(tmp_path / "bad"), "--format", "w4a16", "--group-size", "64"])
    error = capsys.readouterr().err
    assert status == 2
    assert (
        "experts.0.down_proj: group_size 64 does not divide its input width 32; group sizes that do: 16 or 32"
        in error
    )
    assert not (tmp_path / "bad").exists()


def test_quantised_source_is_refused(source: Path, tmp_path: Path) -> None:
    convert_checkpoint(source, tmp_path / "fp8", ConvertOptions("fp8"))
    with pytest.raises(ConvertError, match="already has a quantization_config"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "again", ConvertOptions("fp8"))
