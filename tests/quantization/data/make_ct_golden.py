"""Regenerate ct_golden.safetensors: compressed-tensors' own quantise/compress/decompress of a few tensors.

Run in a scratch environment that has the library (it is not a dependency of canvas-serve):

    python -m venv /tmp/ctvenv && /tmp/ctvenv/bin/pip install torch==2.13.0 compressed-tensors==0.20.1
    /tmp/ctvenv/bin/python tests/quantization/data/make_ct_golden.py

For each scheme the scale (and zero point / global scale) come from compressed-tensors'
`calculate_qparams` / `generate_gparam` over the weight's min and max (what llm-compressor's
data-free minmax observer computes), the stored tensors from the scheme's compressor (`compress`),
and `<scheme>.decompressed` from its `decompress`. Tensor names: `<scheme>.<tensor>`; inputs are
`input.<i>` (fp32). Small on purpose: the file is a few tens of kilobytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors.torch import save_file

OUT = Path(__file__).with_name("ct_golden.safetensors")
GROUP = 32


def inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(20)
    plain = torch.randn(32, 64, generator=gen) * 0.05
    skewed = torch.rand(16, 96, generator=gen) * 0.1 - 0.02  # mostly positive: zero points matter
    outliers = torch.randn(16, 64, generator=gen) * 0.02
    outliers[3, 5] = 1.5  # one huge value: tiny blocks elsewhere
    outliers[7, 16:32] = 0.0  # an all-zero block / group
    return [plain, skewed, outliers]


def scheme(name: str, group: int | None) -> QuantizationScheme:
    preset = preset_name_to_scheme(name, ["Linear"])
    if group is not None and preset.weights is not None:
        preset.weights.group_size = group
    return preset


def qparams(weight: torch.Tensor, sch: QuantizationScheme) -> dict[str, torch.Tensor]:
    args = sch.weights
    assert args is not None
    if args.strategy == "channel":
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    else:
        grouped = weight.unflatten(1, (-1, args.group_size))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    state: dict[str, torch.Tensor] = {"weight": weight}
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(weight.amin(), weight.amax())
        state["weight_global_scale"] = global_scale
    scale, zero = calculate_qparams(low, high, args, global_scale=global_scale)
    state["weight_scale"] = scale.to(weight.dtype)
    state["weight_zero_point"] = zero
    return state


def main() -> None:
    cases = {"fp8": ("FP8_DYNAMIC", None), "w4a16": ("W4A16", GROUP), "w4a16_asym": ("W4A16_ASYM", GROUP)}
    cases["nvfp4"] = ("NVFP4A16", None)
    tensors: dict[str, torch.Tensor] = {}
    for i, weight in enumerate(inputs()):
        tensors[f"input.{i}"] = weight
        for label, (preset, group) in cases.items():
            sch = scheme(preset, group)
            fmt = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized"}.get(label, "pack-quantized")
            compressor = BaseCompressor.get_value_from_registry(fmt)
            compressed = compressor.compress(qparams(weight, sch), sch)
            for name, value in compressed.items():
                tensors[f"{label}.{i}.{name}"] = value.contiguous()
            decompressed = compressor.decompress(dict(compressed), sch)
            tensors[f"{label}.{i}.decompressed"] = decompressed["weight"].float().contiguous()
    save_file(tensors, str(OUT), metadata={"compressed_tensors": compressed_tensors.__version__})
    print(f"wrote {len(tensors)} tensors to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
