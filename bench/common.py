"""Pieces every benchmark shares: random checkpoints saved by transformers, and the machine header."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.methods.base import ExpertsMethod
from engine.model.methods.plain import LoopedExperts
from recipes.reference_config import text_only_config

SMALL_TEXT: dict[str, Any] = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    sliding_window=256,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=256,
    max_position_embeddings=4096,
    use_bidirectional_attention="vision",
)
"""A small random config with the real model's proportions (5 sliding : 1 full, K = V, MoE + dense MLP)
for serving benchmarks on the CPU."""


def save_random_checkpoint(path: Path, text: dict[str, Any], canvas_length: int, seed: int = 0) -> None:
    """A random-init reference model (seed fixed), saved in Hugging Face format."""
    torch.manual_seed(seed)
    DiffusionGemmaForBlockDiffusion(text_only_config(text, canvas_length)).save_pretrained(path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine, anything above ~0 beyond us skews the timings."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_header() -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1min": load_average(),
        "malloc": os.environ.get("LD_PRELOAD") or "glibc",
    }


def start(threads: int) -> None:
    """A benchmark's first lines: torch's threads (0 keeps torch's default), then the machine header."""
    if threads:
        torch.set_num_threads(threads)
    print("  ".join(f"{k}={v}" for k, v in machine_header().items()), flush=True)


@contextmanager
def experts_in(model: DiffusionGemma, method: type[ExpertsMethod] = LoopedExperts) -> Iterator[None]:
    """Within the block every layer's experts run `method`, by default the reference loop (their method
    is chosen at load, and by `compile_layers`)."""
    methods = [layer.experts.method for layer in model.layers]
    for layer in model.layers:
        layer.experts.method = method()
    try:
        yield
    finally:
        for layer, method in zip(model.layers, methods, strict=True):
            layer.experts.method = method
