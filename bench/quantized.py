"""Quantised DiffusionGemma on the CPU: resident weight memory and denoise speed per format (issue 20).

Models are built directly in their stored form, never through a float copy: the engine's model is
constructed on the meta device with the weight methods a checkpoint of that format selects
(`engine.model.methods.selection`: a `quantization_config` as the converter writes it, or
`--quantization int8|fp8`), every parameter and buffer is then allocated in its own dtype
(`to_empty`) and filled in place with random values of a sensible range (random codes and bytes for
packed weights, fixed scales), and each method's `process_weights_after_loading` runs, as the loader
does. Formats: fp32, bf16 (plain); int8 (`--quantization int8`, weight-only, `_weight_int8pack_mm`);
fp8 (FP8 per channel as RedHatAI's FP8-dynamic; on the CPU the reference dequantise-then-matmul);
w4a16 (compressed-tensors pack-quantized, group 64: 704 = 11 x 64, 128 does not divide it); nvfp4
(ModelOpt: only the experts quantised, the rest bf16). Quantised formats compute in bf16.

Two runs:
- `slice`: the real layer shapes (hidden 2816, 128 experts of 704, top-8, vocab 262144, the 26B's head
  dims, a 5:1 sliding/full pattern cut to `--layers` layers, 2 by default: one sliding, one full),
  each format: parameter + buffer bytes, and the median wall time of one denoise forward (one
  256-token canvas over a 128-token prompt already in the cache, plus the tied LM head's logits).
- `full`: the whole 26B-A4B text config (30 layers) in `--format` (nvfp4 or w4a16), built the same
  way: parameter bytes, the process's RSS, and the wall time of the prompt's prefill and of one
  denoise step, run once. Other formats' 26B bytes are computed on the meta device (`--sizes`).

    python bench/quantized.py slice --threads 1 [--formats fp32 bf16 int8 fp8 w4a16 nvfp4]
    python bench/quantized.py full --format nvfp4 --threads 2
    python bench/quantized.py sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine_header
from bench.forward import our_forward, prepare_ours
from engine.config import ModelConfig
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.methods.base import WeightMethod
from engine.model.methods.selection import select_weight_methods
from engine.quantization.fp8 import FP8_DTYPE
from engine.quantization.methods import QuantExperts, QuantLinear, resident_bytes
from engine.quantization.targets import quantization_config
from engine.quantization.weight_kernels import Int4CpuKernel
from recipes.reference_config import text_only_config

CANVAS = 256
PROMPT = 128
W4A16_GROUP = 64
REAL_TEXT: dict[str, Any] = dict(
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262144,
    final_logit_softcapping=30.0,
    use_bidirectional_attention="vision",
)
"""The 26B-A4B text config (/work/shared/reference/diffusiongemma.md section 2.4)."""

FORMATS = ("fp32", "bf16", "int8", "fp8", "w4a16", "w4a16-int4", "nvfp4")
"""`w4a16-int4`: the same W4A16 weights repacked for the CPU int4 kernel whatever the extra bytes
(its (K/g, N, 2) scales_and_zeros in bf16 against the stored (N, K/g) bf16 scales: +5.9% at g = 64),
which the automatic selection refuses beyond 5%."""
_CT_IGNORE = ["lm_head", "re:.*router.*", "re:.*self_conditioning.*"]


def model_config(layers: int) -> ModelConfig:
    """The real config cut to `layers` layers (a slice keeps the 5:1 pattern's first and a full layer)."""
    kinds = REAL_TEXT["layer_types"]
    layer_types = kinds if layers == len(kinds) else [*kinds[: layers - 1], "full_attention"]
    text = REAL_TEXT | {"num_hidden_layers": layers, "layer_types": layer_types}
    data = text_only_config(text, CANVAS).to_dict()
    return ModelConfig.from_hf(data | {"architectures": ["DiffusionGemmaForBlockDiffusion"]})


def selection_args(fmt: str) -> tuple[Mapping[str, Any] | None, str | None, torch.dtype]:
    """(quantization_config, --quantization, compute dtype) for a benchmark format."""
    if fmt == "fp32":
        return None, None, torch.float32
    if fmt == "bf16":
        return None, None, torch.bfloat16
    if fmt in ("int8", "fp8"):
        return None, fmt, torch.bfloat16
    if fmt in ("w4a16", "w4a16-int4"):
        return quantization_config("w4a16", _CT_IGNORE, W4A16_GROUP), None, torch.bfloat16
    if fmt == "nvfp4":
        return quantization_config("nvfp4-modelopt", []), None, torch.bfloat16
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def meta_model(config: ModelConfig, fmt: str) -> tuple[DiffusionGemma, torch.dtype]:
    """The model with `fmt`'s methods on the meta device (plain parameters in the compute dtype)."""
    qconfig, requested, dtype = selection_args(fmt)
    methods = select_weight_methods(qconfig, config, torch.device("cpu"), dtype, requested)
    with torch.device("meta"):
        model = DiffusionGemma(config, methods)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._parameters[leaf] = nn.Parameter(param.to(dtype), requires_grad=False)
    for name, buffer in model.named_buffers():  # as the loader casts them; quantised tensors keep theirs
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        quantised = isinstance(getattr(module, "method", None), QuantLinear | QuantExperts)
        if buffer.is_floating_point() and not quantised and "inv_freq" not in leaf:
            module._buffers[leaf] = buffer.to(dtype)
    return model, dtype


_POOL = 1 << 24
"""Elements of random values generated once per kind and tiled over each tensor: drawing every byte
of a 17 GB model from a generator takes many minutes on this CPU, copying takes seconds."""


class Filler:
    """Random values of a sensible range for each stored tensor, in place, in its own dtype."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.pools: dict[str, torch.Tensor] = {}

    def pool(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        key = f"{kind}:{dtype}"
        if key not in self.pools:
            self.pools[key] = self._draw(kind, dtype)
        return self.pools[key]

    def _draw(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        g = self.generator
        if kind == "normal":
            return torch.randn(_POOL, generator=g).mul_(0.02).to(dtype)
        if kind == "fp8-weight":  # +-(0.5 .. 1.9)
            bits = torch.randint(0x30, 0x40, (_POOL,), generator=g, dtype=torch.uint8)
            bits[::2] |= 0x80
            return bits
        if kind == "fp8-scale":  # NVFP4 block scales 0.5 .. 0.94
            return torch.randint(0x30, 0x38, (_POOL,), generator=g, dtype=torch.uint8)
        if kind == "bytes":
            return torch.randint(0, 256, (_POOL,), generator=g, dtype=torch.uint8)
        if kind == "int8":
            return torch.randint(-127, 128, (_POOL,), generator=g, dtype=torch.int8)
        raise ValueError(kind)

    @torch.no_grad()
    def fill_(self, name: str, tensor: torch.Tensor) -> None:
        leaf = name.rpartition(".")[2]
        if tensor.dtype == FP8_DTYPE:
            kind = "fp8-scale" if leaf.endswith("weight_scale") else "fp8-weight"
            _tile_(tensor.view(torch.uint8), self.pool(kind, torch.uint8))
        elif tensor.dtype in (torch.uint8, torch.int32):  # NVFP4 codes, packed int4: any bytes
            _tile_(tensor.view(torch.uint8), self.pool("bytes", torch.uint8))
        elif tensor.dtype == torch.int8:
            _tile_(tensor, self.pool("int8", torch.int8))
        elif tensor.dtype == torch.int64:  # weight_shape: unused by the kernels
            tensor.zero_()
        elif leaf.endswith(("weight_scale", "weight_scale_2")):  # weights of magnitude ~1e-3 x codes
            tensor.fill_(1e-3)
        elif leaf.endswith(("weight_global_scale", "input_scale", "input_global_scale")) or tensor.ndim <= 1:
            tensor.fill_(1.0)
        else:
            _tile_(tensor, self.pool("normal", tensor.dtype))


def _tile_(tensor: torch.Tensor, pool: torch.Tensor) -> None:
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), pool.numel()):
        chunk = flat[start : start + pool.numel()]
        chunk.copy_(pool[: chunk.numel()])


def build(config: ModelConfig, fmt: str, seed: int = 0) -> DiffusionGemma:
    """Allocate `fmt`'s model tensor by tensor in its stored dtypes, fill it, run the post-load step."""
    model, _ = meta_model(config, fmt)
    if fmt == "w4a16-int4":
        for module in model.modules():
            kernel = getattr(getattr(module, "method", None), "kernel", None)
            if isinstance(kernel, Int4CpuKernel):
                kernel.max_overhead = float("inf")
    model.to_empty(device="cpu")
    filler = Filler(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "inv_freq" not in name:
            filler.fill_(name, tensor)
    for module in model.modules():
        method = getattr(module, "method", None)
        if isinstance(method, WeightMethod):
            method.process_weights_after_loading(module)
    model.reset_rope_buffers(torch.device("cpu"))
    return model.eval().requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, the RoPE tables left out."""
    rope = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "inv_freq" in n)
    return resident_bytes(model) - rope


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GB (1e9 bytes)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024 / 1e9, int(fields["VmHWM"].split()[0]) * 1024 / 1e9


def denoise_inputs(config: ModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT), generator=generator)
    canvas = torch.randint(3, config.vocab_size, (1, CANVAS), generator=generator)
    return prompt, canvas


@torch.no_grad()
def time_denoise(model: DiffusionGemma, reps: int) -> tuple[float, list[float]]:
    """(prefill seconds, denoise seconds per rep) for one canvas over one prompt."""
    prompt, canvas = denoise_inputs(model.config, 0)
    start = time.perf_counter()
    batch, caches, head = prepare_ours(model, prompt, canvas)
    prefill = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        logits = our_forward(model, batch, caches, head)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(logits[0]).all(), "non-finite logits"
    return prefill, times


def run_slice(args: argparse.Namespace) -> list[dict[str, Any]]:
    config = model_config(args.layers)
    rows = []
    for fmt in args.formats:
        stored = weight_bytes(meta_model(config, fmt)[0])
        model = build(config, fmt)
        resident = weight_bytes(model)
        _, times = time_denoise(model, args.reps)
        median = statistics.median(times)
        row = {
            "format": fmt,
            "stored_gb": stored / 1e9,
            "resident_gb": resident / 1e9,
            "resident_vs_stored": resident / stored - 1,
            "denoise_s": median,
            "best_s": min(times),
            "tok_per_s": CANVAS / median,
        }
        rows.append(row)
        print(
            f"{fmt:>6} | stored {row['stored_gb']:6.3f} GB | resident {row['resident_gb']:6.3f} GB "
            f"({100 * row['resident_vs_stored']:+.1f}%) | denoise {median:7.2f} s (best {min(times):.2f}) | "
            f"{row['tok_per_s']:7.1f} tok/s",
            flush=True,
        )
        del model
    return rows


def run_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    config = model_config(30)
    rows = []
    for fmt in FORMATS:
        model, _ = meta_model(config, fmt)
        experts = sum(resident_bytes(m) for n, m in model.named_modules() if n.endswith(".experts"))
        embed = model.embed_tokens.weight
        row = {
            "format": fmt,
            "total_gb": weight_bytes(model) / 1e9,
            "experts_gb": experts / 1e9,
            "embeddings_gb": embed.numel() * embed.element_size() / 1e9,
        }
        rows.append(row)
        print(
            f"{fmt:>6} | 26B-A4B text weights {row['total_gb']:6.2f} GB (experts {row['experts_gb']:6.2f}, "
            f"embeddings {row['embeddings_gb']:.2f}) computed on the meta device",
            flush=True,
        )
    return rows


def run_full(args: argparse.Namespace) -> dict[str, Any]:
    config = model_config(30)
    stored = weight_bytes(meta_model(config, args.format)[0])
    print(f"building the 26B-A4B text model in {args.format}: {stored / 1e9:.2f} GB of weights", flush=True)
    start = time.perf_counter()
    model = build(config, args.format)
    built = time.perf_counter() - start
    rss_built, _ = rss_gb()
    prefill, times = time_denoise(model, 1)
    rss_now, rss_peak = rss_gb()
    row = {
        "format": args.format,
        "stored_gb": stored / 1e9,
        "resident_gb": weight_bytes(model) / 1e9,
        "params": sum(t.numel() for t in model.parameters()),
        "build_s": built,
        "rss_after_build_gb": rss_built,
        "rss_after_step_gb": rss_now,
        "rss_peak_gb": rss_peak,
        "prefill_128_s": prefill,
        "denoise_256_s": times[0],
    }
    print(json.dumps(row, indent=2), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    slice_ = sub.add_parser("slice", help="every format on a slice of the real shape")
    slice_.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    slice_.add_argument("--layers", type=int, default=2)
    slice_.add_argument("--reps", type=int, default=3)
    full = sub.add_parser("full", help="the whole 26B-A4B text model, one denoise step")
    full.add_argument("--format", choices=("nvfp4", "w4a16"), default="nvfp4")
    sub.add_parser("sizes", help="the 26B-A4B text weights' bytes per format (meta device)")
    for p in (slice_, full, sub.choices["sizes"]):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(machine_header()), flush=True)
    runs = {"slice": run_slice, "full": run_full, "sizes": run_sizes}
    result = runs[args.command](args)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine_header(), "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
