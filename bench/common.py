"""Pieces every benchmark shares: random checkpoints saved by transformers, and the machine header."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
)


def reference_config(text: dict[str, Any], canvas_length: int) -> DiffusionGemmaConfig:
    """A DiffusionGemma config around `text`; image token ids sit at the top of the vocabulary."""
    vocab = int(text["vocab_size"])
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=VISION,
        canvas_length=canvas_length,
        image_token_id=vocab - 3,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 1,
    )


def save_random_checkpoint(path: Path, text: dict[str, Any], canvas_length: int, seed: int = 0) -> None:
    """A random-init reference model (seed fixed), saved in Hugging Face format."""
    torch.manual_seed(seed)
    DiffusionGemmaForBlockDiffusion(reference_config(text, canvas_length)).save_pretrained(path)


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
    }
