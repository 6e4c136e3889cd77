"""Write a plain DiffusionGemma checkpoint in a published quantised layout, tensor by tensor.

    python -m engine.quantization.convert SRC DST --format fp8|w4a16|nvfp4-ct|nvfp4-modelopt \
        [--group-size 32] [--asymmetric] [--scale-dtype bfloat16|float16|float32]

Reads SRC's safetensors (single file or sharded) one tensor at a time and writes DST with the
published checkpoints' names, dtypes and shapes (`engine.quantization.layout`) and config keys
(`engine.quantization.targets`): the fused experts `experts.gate_up_proj` (E, 2I, H) and
`experts.down_proj` (E, H, I) become per-expert 2-D modules `experts.<e>.{gate,up,down}_proj`
(gate = rows [:I], up = rows [I:], as llm-compressor linearises them); quantised linears get the
format's tensors; everything else (norms, embeddings, router, vision) is copied unchanged. The
tokenizer, generation config and other files are copied; config.json gains `quantization_config`
(and `hf_quant_config.json` is written for ModelOpt).

Memory: one source tensor in float at a time (an expert slice for the fused experts) plus the
output shard being filled (`--max-shard-gb`). Scales are stored in the source weights' dtype unless
`--scale-dtype` says otherwise (a bf16 model gets BF16 scales, as published). Quantisation is
round-to-nearest and data-free; on llm-compressor's own output for the same tiny model the stored
tensors are bit-identical (tests/quantization/test_convert.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from engine.quantization.fp8 import quantize_fp8_channel
from engine.quantization.layout import FLOAT_SCALES
from engine.quantization.nvfp4 import fused_amax, quantize_nvfp4_ct, quantize_nvfp4_modelopt
from engine.quantization.parse import parse_quantization_config
from engine.quantization.scheme import LinearFormat, QuantScheme, SchemeError, WeightFormat
from engine.quantization.targets import (
    FORMATS,
    compressed_tensors_ignore,
    hf_quant_config,
    quantization_config,
)
from engine.quantization.w4a16 import quantize_w4a16

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

_FUSED_EXPERTS = re.compile(r"^(model\.decoder\.layers\.\d+)\.experts\.(gate_up_proj|down_proj)$")
_ENCODER_LAYER = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.")
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_FUSED_SIBLINGS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
_FUSED_SIBLINGS |= {"k_proj": _FUSED_SIBLINGS["q_proj"], "v_proj": _FUSED_SIBLINGS["q_proj"]}
_FUSED_SIBLINGS |= {"up_proj": _FUSED_SIBLINGS["gate_proj"]}


class ConvertError(RuntimeError):
    """The source checkpoint cannot be converted; the message names the file or tensor at fault."""


@dataclass(frozen=True)
class ConvertOptions:
    """What to write. `group_size`/`symmetric`: W4A16 only. `scale_dtype` None: the weights' own."""

    format: str
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: torch.dtype | None = None
    max_shard_bytes: int = 4 << 30


class SourceTensors:
    """A checkpoint directory's tensors by name, read one at a time from memory-mapped files."""

    def __init__(self, root: Path) -> None:
        self.files = _weight_files(root)
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        """Every tensor name, in file then name order (one shard open at a time in practice)."""
        return sorted(self.files, key=lambda name: (self.files[name], name))

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the file header."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        """One tensor, as stored."""
        tensor: Tensor = self._handle(name).get_tensor(name)
        return tensor

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]


def _weight_files(root: Path) -> dict[str, Path]:
    if (root / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((root / WEIGHTS_INDEX).read_text()).get("weight_map", {})
        return {name: root / shard for name, shard in weight_map.items()}
    if (root / SINGLE_WEIGHTS).is_file():
        with safe_open(str(root / SINGLE_WEIGHTS), framework="pt") as handle:
            return {name: root / SINGLE_WEIGHTS for name in handle.keys()}  # noqa: SIM118
    raise ConvertError(f"no weights in {root}: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")


def linear_modules(source: SourceTensors) -> dict[str, tuple[int, int]]:
    """Every linear module the converted checkpoint stores -> (out, in): decoder and vision linears,
    the fused experts split per expert and projection."""
    modules: dict[str, tuple[int, int]] = {}
    for name in source.names():
        shape = source.shape(name)
        if match := _FUSED_EXPERTS.match(name):
            modules |= _expert_modules(match.group(1), match.group(2), shape)
        elif _is_linear_weight(name, shape):
            modules[name.removesuffix(".weight")] = (shape[0], shape[1])
    return modules


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` under the decoder or vision tower, other than the token embedding."""
    in_scope = name.startswith(("model.decoder.", *_VISION)) and "embed_tokens" not in name
    return in_scope and name.endswith(".weight") and len(shape) == 2


def _expert_modules(layer: str, fused: str, shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    num_experts, rows, width = shape
    if fused == "down_proj":
        return {f"{layer}.experts.{e}.down_proj": (rows, width) for e in range(num_experts)}
    half = rows // 2
    projections = ("gate_proj", "up_proj")
    return {f"{layer}.experts.{e}.{p}": (half, width) for e in range(num_experts) for p in projections}


def build_config(source: SourceTensors, options: ConvertOptions) -> dict[str, Any]:
    """The `quantization_config` for `options` over this checkpoint's modules."""
    if options.format not in FORMATS:
        raise ConvertError(f"--format {options.format!r} is not one of {', '.join(FORMATS)}")
    encoder_layers = {int(m.group(1)) for name in source.names() if (m := _ENCODER_LAYER.match(name))}
    ignore = compressed_tensors_ignore(options.format, linear_modules(source), encoder_layers)
    return quantization_config(options.format, ignore, options.group_size, options.symmetric)


def stored_tensors(
    weight: Tensor, fmt: LinearFormat, scale_dtype: torch.dtype, amax: Tensor | None
) -> dict[str, Tensor]:
    """One (N, K) float weight quantised as `fmt` -> its checkpoint tensors by name suffix.

    `amax`: the largest |value| over the projections sharing the NVFP4 global scale (None: its own).
    """
    if fmt.weight == WeightFormat.FP8_CHANNEL:
        return quantize_fp8_channel(weight, scale_dtype).tensors()
    if fmt.weight == WeightFormat.W4A16:
        assert fmt.group_size is not None, "W4A16 formats carry a group size"
        return quantize_w4a16(weight, fmt.group_size, fmt.symmetric, scale_dtype).tensors()
    if fmt.weight == WeightFormat.NVFP4_CT:
        return quantize_nvfp4_ct(weight, amax).tensors()
    if fmt.weight == WeightFormat.NVFP4_MODELOPT:
        return quantize_nvfp4_modelopt(weight, amax).modelopt_tensors()
    raise ConvertError(f"{fmt.weight.value} is quantised at load, never stored")


class _Converter:
    """Turns each source tensor into the tensors the converted checkpoint stores for it."""

    def __init__(self, source: SourceTensors, scheme: QuantScheme, options: ConvertOptions) -> None:
        self.source, self.scheme, self.options = source, scheme, options
        self.linears = linear_modules(source)

    def convert(self, name: str) -> Iterator[tuple[str, Tensor]]:
        if match := _FUSED_EXPERTS.match(name):
            yield from self._experts(match.group(1), match.group(2), self.source.get(name))
            return
        module = name.removesuffix(".weight")
        is_linear = name.endswith(".weight") and module in self.linears and name.startswith("model.decoder.")
        fmt = self.scheme.format_for(module) if is_linear else None
        tensor = self.source.get(name)
        if fmt is None:
            yield name, tensor
            return
        amax = self._shared_amax(module, fmt)
        for suffix, stored in stored_tensors(tensor, fmt, self._scale_dtype(tensor), amax).items():
            yield f"{module}.{suffix}", stored

    def _experts(self, layer: str, fused: str, weights: Tensor) -> Iterator[tuple[str, Tensor]]:
        fmt = self.scheme.experts_format(layer, weights.shape[0])
        if fmt is None:
            yield f"{layer}.experts.{fused}", weights
            return
        for e in range(weights.shape[0]):
            parts = (
                {"down_proj": weights[e]}
                if fused == "down_proj"
                else dict(zip(("gate_proj", "up_proj"), weights[e].chunk(2), strict=True))
            )
            amax = fused_amax(*parts.values()) if fmt.weight in _NVFP4 else None
            for proj, part in parts.items():
                for suffix, stored in stored_tensors(part, fmt, self._scale_dtype(part), amax).items():
                    yield f"{layer}.experts.{e}.{proj}.{suffix}", stored

    def _shared_amax(self, module: str, fmt: LinearFormat) -> Tensor | None:
        if fmt.weight not in _NVFP4:
            return None
        parent, leaf = module.rsplit(".", 1)
        siblings = [f"{parent}.{s}.weight" for s in _FUSED_SIBLINGS.get(leaf, (leaf,))]
        return fused_amax(*(self.source.get(n) for n in siblings if n in self.source.files))

    def _scale_dtype(self, weight: Tensor) -> torch.dtype:
        if self.options.scale_dtype is not None:
            return self.options.scale_dtype
        return weight.dtype if weight.dtype in FLOAT_SCALES else torch.bfloat16


_NVFP4 = (WeightFormat.NVFP4_CT, WeightFormat.NVFP4_MODELOPT)


class _ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever `max_bytes` is reached."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, int]] = []  # name -> bytes, per written shard

    def add(self, name: str, tensor: Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_bytes:
            self._flush()

    def finish(self) -> None:
        """Write the last shard and name them: one `model.safetensors`, or numbered shards + index."""
        self._flush()
        count = len(self.shards)
        if count == 1:
            (self.root / "shard-0.tmp").rename(self.root / SINGLE_WEIGHTS)
            return
        weight_map: dict[str, str] = {}
        for i, sizes in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.root / f"shard-{i}.tmp").rename(self.root / final)
            weight_map |= dict.fromkeys(sizes, final)
        total = sum(sum(sizes.values()) for sizes in self.shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))

    def _flush(self) -> None:
        if not self.pending and self.shards:
            return
        save_file(self.pending, str(self.root / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append({name: t.numel() * t.element_size() for name, t in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0


def convert_checkpoint(src: str | Path, dst: str | Path, options: ConvertOptions) -> Path:
    """Write SRC converted per `options` into the new directory DST; returns DST."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / CONFIG_FILE).read_text())
    if "quantization_config" in config:
        raise ConvertError(
            f"{src / CONFIG_FILE} already has a quantization_config: convert a plain checkpoint"
        )
    source = SourceTensors(src)
    qconfig = build_config(source, options)
    scheme = parse_quantization_config(qconfig)
    scheme.check_widths({module: shape[1] for module, shape in linear_modules(source).items()})
    dst.mkdir(parents=True, exist_ok=False)
    writer = _ShardWriter(dst, options.max_shard_bytes)
    converter = _Converter(source, scheme, options)
    for name in source.names():
        for out_name, tensor in converter.convert(name):
            writer.add(out_name, tensor)
    writer.finish()
    _write_configs(src, dst, config, qconfig)
    return dst


def _write_configs(src: Path, dst: Path, config: dict[str, Any], qconfig: dict[str, Any]) -> None:
    (dst / CONFIG_FILE).write_text(json.dumps(config | {"quantization_config": qconfig}, indent=2))
    if qconfig["quant_method"] == "modelopt":
        (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(), indent=2))
    for path in sorted(src.iterdir()):
        is_weights = path.suffix == ".safetensors" or path.name in (WEIGHTS_INDEX, CONFIG_FILE)
        if path.is_file() and not is_weights:
            shutil.copy2(path, dst / path.name)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 with a message for an unconvertible input)."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.quantization.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", type=Path, help="plain checkpoint directory")
    parser.add_argument("dst", type=Path, help="new directory to write")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--group-size", type=int, default=32, help="W4A16 elements per scale (default 32)")
    parser.add_argument("--asymmetric", action="store_true", help="W4A16 with zero points")
    parser.add_argument("--scale-dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    options = ConvertOptions(
        args.format,
        args.group_size,
        not args.asymmetric,
        getattr(torch, args.scale_dtype) if args.scale_dtype else None,
        int(args.max_shard_gb * (1 << 30)),
    )
    try:
        convert_checkpoint(args.src, args.dst, options)
    except (ConvertError, SchemeError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
