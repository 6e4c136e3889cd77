"""The formats' exact math: known values, round trips, and agreement with compressed-tensors itself.

`data/ct_golden.safetensors` holds compressed-tensors 0.20.1's own compression and decompression of
three small weights (how it was made: data/make_ct_golden.py); our quantisers must store the same
tensors bit for bit and our dequantisers must give the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.quantization.e2m1 import decode_e2m1, e2m1_table, encode_e2m1, pack_nibbles, unpack_nibbles
from engine.quantization.fp8 import FP8_DTYPE, dequantize_fp8_channel, quantize_fp8_channel
from engine.quantization.int4_pack import pack_int4, unpack_int4
from engine.quantization.int8 import dequantize_int8_channel, quantize_int8_channel
from engine.quantization.nvfp4 import (
    dequantize_nvfp4_ct,
    dequantize_nvfp4_modelopt,
    quantize_nvfp4_ct,
    quantize_nvfp4_modelopt,
)
from engine.quantization.w4a16 import check_group_size, dequantize_w4a16, quantize_w4a16

GOLDEN = Path(__file__).parent / "data" / "ct_golden.safetensors"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def golden_inputs(golden: dict[str, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    return [(i, golden[f"input.{i}"]) for i in range(3)]


# ---- E2M1 -------------------------------------------------------------------------------------------


def test_e2m1_table_and_byte_layout() -> None:
    assert e2m1_table().tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.signbit(e2m1_table()[8])  # code 8 is -0.0
    codes = encode_e2m1(torch.tensor([[-1.0, 1.0]]))
    assert codes.tolist() == [[0xA, 0x2]]
    assert pack_nibbles(codes).tolist() == [[0x2A]]  # column 0 in the low nibble
    assert decode_e2m1(unpack_nibbles(torch.tensor([[0x2A]], dtype=torch.uint8))).tolist() == [[-1.0, 1.0]]


def test_e2m1_rounds_to_nearest_ties_to_even() -> None:
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 2.51, 3.5, 5.0, 5.01, 9.0, -0.1, -2.6])
    want = [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0, -0.0, -3.0]
    got = decode_e2m1(encode_e2m1(x))
    assert got.tolist() == want
    assert torch.signbit(got[11])  # a small negative value keeps its sign bit, as compressed-tensors packs it


def test_e2m1_every_code_round_trips() -> None:
    codes = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert torch.equal(encode_e2m1(decode_e2m1(codes)), codes)


# ---- int4 packing -----------------------------------------------------------------------------------


def test_int4_packs_least_significant_first() -> None:
    row = torch.tensor([[-8, -7, 0, 7, 0, 0, 0, 0]], dtype=torch.int8)
    assert pack_int4(row).tolist() == [[0x8888F810 - 2**32]]


@pytest.mark.parametrize(("rows", "width"), [(3, 8), (5, 13), (16, 64)])
def test_int4_round_trip_along_either_dim(rows: int, width: int) -> None:
    values = torch.randint(-8, 8, (rows, width), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert pack_int4(values).shape == (rows, -(-width // 8))
    assert torch.equal(unpack_int4(pack_int4(values), width), values)
    assert torch.equal(unpack_int4(pack_int4(values, dim=0), rows, dim=0), values)


def test_int4_unpack_names_a_bad_width() -> None:
    with pytest.raises(ValueError, match="cannot hold 20"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 20)


# ---- FP8 and int8 per channel -----------------------------------------------------------------------


def test_fp8_known_values() -> None:
    weight = torch.tensor([[448.0, -224.0, 1.0], [0.0, 0.0, 0.0]])
    q = quantize_fp8_channel(weight, torch.float32)
    assert q.weight.dtype == FP8_DTYPE and q.weight_scale.shape == (2, 1)
    assert q.weight_scale.flatten().tolist() == [1.0, torch.finfo(torch.float32).eps]
    assert dequantize_fp8_channel(q.weight, q.weight_scale, torch.float32).tolist() == weight.tolist()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_is_within_e4m3_precision(scale_dtype: torch.dtype) -> None:
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    q = quantize_fp8_channel(weight, scale_dtype)
    assert q.weight_scale.dtype == scale_dtype
    back = dequantize_fp8_channel(q.weight, q.weight_scale, torch.float32)
    step = weight.abs().amax(dim=1, keepdim=True) / 448 * 32  # e4m3: 3 mantissa bits, <= 1/16 relative
    assert ((back - weight).abs() <= step / 2 + weight.abs() / 16).all()
    again = quantize_fp8_channel(back, scale_dtype)  # quantising a dequantised weight changes nothing
    assert torch.equal(again.weight.view(torch.uint8), q.weight.view(torch.uint8))


def test_int8_round_trip() -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    weight[2] = 0.0
    q = quantize_int8_channel(weight)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    back = dequantize_int8_channel(q.weight, q.weight_scale, torch.float32)
    assert ((back - weight).abs() <= q.weight_scale[:, None] / 2 + 1e-7).all()
    assert back[2].abs().max() == 0


# ---- W4A16 ------------------------------------------------------------------------------------------


def test_w4a16_symmetric_known_values() -> None:
    weight = torch.tensor([[7.5, -7.5, 1.0, 0.0] * 8])  # one group of 32, max 7.5 -> scale 1
    q = quantize_w4a16(weight, group_size=32, scale_dtype=torch.float32)
    assert q.weight_scale.tolist() == [[1.0]] and q.weight_zero_point is None
    assert q.weight_shape.tolist() == [1, 32]
    assert unpack_int4(q.weight_packed, 32)[0, :4].tolist() == [7, -8, 1, 0]  # 7.5 clamps, -7.5 ties to even
    back = dequantize_w4a16(q.weight_packed, q.weight_scale, None, 32, torch.float32)
    assert back[0, :4].tolist() == [7.0, -8.0, 1.0, 0.0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_round_trip(symmetric: bool) -> None:
    weight = torch.rand(8, 64, generator=torch.Generator().manual_seed(4)) - 0.2
    q = quantize_w4a16(weight, group_size=16, symmetric=symmetric, scale_dtype=torch.float32)
    back = dequantize_w4a16(q.weight_packed, q.weight_scale, q.weight_zero_point, 64, torch.float32)
    step = q.weight_scale.repeat_interleave(16, dim=1)
    assert ((back - weight).abs() <= step * 0.5 + 1e-6).all()
    if not symmetric:
        assert q.weight_zero_point is not None and q.weight_zero_point.shape == (1, 4)


def test_group_size_error_names_tensor_and_working_sizes() -> None:
    with pytest.raises(
        ValueError, match=r"experts\.0\.down_proj: group_size 128 .* width 704.*: 16 or 32 or 64$"
    ):
        check_group_size(704, 128, "experts.0.down_proj")
    check_group_size(704, 64, "experts.0.down_proj")


# ---- NVFP4 ------------------------------------------------------------------------------------------


def test_nvfp4_representable_weights_are_exact() -> None:
    """Weights that are exactly e2m1 * block scale * global scale come back bit for bit, both ways."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8, generator=gen)
    codes[:, 0] = 7  # every block reaches 6 * its scale
    codes[:, 16] = 7
    block = torch.tensor([[1.0, 0.5], [2.0, 0.25], [448.0, 1.0], [3.0, 8.0]]).repeat_interleave(16, dim=1)
    weight = decode_e2m1(codes) * block / 512  # amax 6 * 448 / 512: global scale 512, a power of two
    for quantize, dequantize, stored in (
        (quantize_nvfp4_modelopt, dequantize_nvfp4_modelopt, "weight_scale_2"),
        (quantize_nvfp4_ct, dequantize_nvfp4_ct, "global_scale"),
    ):
        q = quantize(weight)
        back = dequantize(q.packed, q.block_scale, getattr(q, stored), torch.float32)
        assert torch.equal(back, weight), quantize.__name__


def test_nvfp4_conventions_agree_and_are_reciprocal() -> None:
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(6))
    modelopt = quantize_nvfp4_modelopt(weight)
    ct = quantize_nvfp4_ct(weight)
    assert torch.allclose(modelopt.weight_scale_2 * ct.global_scale, torch.tensor(1.0))
    a = dequantize_nvfp4_modelopt(
        modelopt.packed, modelopt.block_scale, modelopt.weight_scale_2, torch.float32
    )
    b = dequantize_nvfp4_ct(ct.packed, ct.block_scale, ct.global_scale, torch.float32)
    scale = weight.abs().amax() / 6
    assert (a - weight).abs().max() <= scale and (b - weight).abs().max() <= scale
    assert (a - b).abs().max() <= 1e-3 * scale  # the same codes and block scales up to float rounding


def test_modelopt_checkpoint_tensors() -> None:
    q = quantize_nvfp4_modelopt(torch.randn(4, 32, generator=torch.Generator().manual_seed(7)))
    tensors = q.modelopt_tensors()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "weight": (torch.uint8, (4, 16)),
        "weight_scale": (FP8_DTYPE, (4, 2)),
        "weight_scale_2": (torch.float32, ()),
        "input_scale": (torch.float32, ()),
    }


# ---- against compressed-tensors ---------------------------------------------------------------------


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
    if ours.dtype == FP8_DTYPE:
        ours, theirs = ours.view(torch.uint8), theirs.view(torch.uint8)
    assert torch.equal(ours, theirs), name


def test_fp8_matches_compressed_tensors(golden: dict[str, torch.Tensor]) -> None:
    for i, weight in golden_inputs(golden):
        q = quantize_fp8_channel(weight, torch.float32)
        for name, tensor in q.tensors().items():
            assert_same_bits(tensor, golden[f"fp8.{i}.{name}"], f"fp8.{i}.{name}")
        back = dequantize_fp8_channel(q.weight, q.weight_scale, torch.float32)
        assert torch.equal(back, golden[f"fp8.{i}.decompressed"])


@pytest.mark.parametrize(("label", "symmetric"), [("w4a16", True), ("w4a16_asym", False)])
def test_w4a16_matches_compressed_tensors(
    golden: dict[str, torch.Tensor], label: str, symmetric: bool
) -> None:
    for i, weight in golden_inputs(golden):
        q = quantize_w4a16(weight, group_size=32, symmetric=symmetric, scale_dtype=torch.float32)
        stored = {
            k.removeprefix(f"{label}.{i}."): v for k, v in golden.items() if k.startswith(f"{label}.{i}.")
        }
        assert set(q.tensors()) == set(stored) - {"decompressed"}
        for name, tensor in q.tensors().items():
            assert_same_bits(tensor, stored[name], f"{label}.{i}.{name}")
        back = dequantize_w4a16(
            q.weight_packed, q.weight_scale, q.weight_zero_point, weight.shape[1], torch.float32
        )
        assert torch.equal(back, stored["decompressed"])


def test_nvfp4_matches_compressed_tensors(golden: dict[str, torch.Tensor]) -> None:
    for i, weight in golden_inputs(golden):
        q = quantize_nvfp4_ct(weight)
        for name, tensor in q.tensors().items():
            assert_same_bits(tensor, golden[f"nvfp4.{i}.{name}"], f"nvfp4.{i}.{name}")
        back = dequantize_nvfp4_ct(q.packed, q.block_scale, q.global_scale, torch.float32)
        # compressed-tensors decompresses NVFP4 to bf16 (its unpacker's default dtype)
        assert torch.equal(back.bfloat16().float(), golden[f"nvfp4.{i}.decompressed"])
