"""From settings to a running service: load the checkpoint, size the cache, build the engine."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from engine.async_engine import AsyncEngine
from engine.config import DiffusionDefaults
from engine.engine import Engine
from engine.model.loader import Checkpoint, CheckpointError, load_checkpoint, read_defaults
from service.default_model import default_model_dir
from service.metrics import Metrics
from service.serving import ServedModel, Service
from service.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = default_model_dir()
"""The embedded default model (the Sudoku solver trained by recipes/sudoku), installed or checked out."""
CPU_KV_CACHE_BYTES = 2 * 1024**3


class SetupError(RuntimeError):
    """The server cannot start with these settings; the message says what to change."""


def model_dir(settings: Settings) -> Path:
    if settings.model is not None:
        return settings.model
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise SetupError(
            f"no model given and the embedded default model is missing at {DEFAULT_MODEL_DIR}: "
            "pass a DiffusionGemma checkpoint directory, e.g. `canvas-serve serve /path/to/model`"
        )
    return DEFAULT_MODEL_DIR


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    wants_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise SetupError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    device = torch.device("cuda" if wants_cuda else "cpu")
    if settings.dtype != "auto":
        return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
    return device, torch.bfloat16 if wants_cuda else auto_cpu_dtype()[0]


def dtype_choice(settings: Settings, device: torch.device, dtype: torch.dtype) -> str:
    """How the dtype was chosen, for the start-up log: e.g. `bfloat16 (--dtype auto: the CPU has
    amx_bf16 and avx512_bf16)`."""
    name = str(dtype).removeprefix("torch.")
    if settings.dtype != "auto":
        return f"{name} (--dtype {settings.dtype})"
    reason = "CUDA" if device.type == "cuda" else auto_cpu_dtype()[1]
    return f"{name} (--dtype auto: {reason})"


def auto_cpu_dtype(flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """bfloat16 where the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), else float32; and why.

    `flags` are the CPU's feature flags (default: read from /proc/cpuinfo; none off Linux). Without
    native bf16, torch emulates bf16 matmuls and they run slower than fp32.
    """
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if native:
        return torch.bfloat16, f"the CPU has {' and '.join(native)}"
    return torch.float32, "the CPU has no AMX-BF16 or AVX512-BF16"


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def diffusion_defaults(settings: Settings, checkpoint: Checkpoint) -> DiffusionDefaults:
    """The checkpoint's generation_config.json, or the reference's ("vllm"), or another folder's,
    then --diffusion-config max_denoising_steps and --hf-overrides diffusion_entropy_bound."""
    choice = settings.generation_config
    if choice == "auto":
        defaults = checkpoint.defaults
    elif choice == "vllm":
        defaults = DiffusionDefaults(eos_token_ids=checkpoint.config.eos_token_ids)
    else:
        folder = Path(choice)
        if not (folder / "generation_config.json").is_file():
            raise SetupError(f"--generation-config {choice}: no generation_config.json there")
        defaults = read_defaults(folder, checkpoint.config)
    steps = settings.diffusion_config.get("max_denoising_steps")
    if steps is not None:
        defaults = replace(defaults, max_denoising_steps=int(steps))
    bound = settings.hf_overrides.get("diffusion_entropy_bound")
    if bound is not None:
        defaults = replace(defaults, entropy_bound=float(bound))
    return defaults


def kv_cache_bytes(settings: Settings, device: torch.device) -> int:
    if settings.kv_cache_memory_gb is not None:
        return int(settings.kv_cache_memory_gb * 1024**3)
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(settings.gpu_memory_utilization * total) - used)


def build_service(settings: Settings) -> tuple[Service, Metrics]:
    """Load the model and build the (not yet started) engine, service and metrics."""
    path = model_dir(settings)
    device, dtype = device_and_dtype(settings)
    try:
        checkpoint = load_checkpoint(path, dtype=dtype, device=device)
    except CheckpointError as error:
        raise SetupError(str(error)) from error
    canvas = checkpoint.config.canvas_length
    asked = settings.diffusion_config.get("canvas_length")
    if asked is not None and int(asked) != canvas:
        raise SetupError(
            f"--diffusion-config canvas_length={asked}, but this checkpoint was trained with {canvas}"
        )
    defaults = diffusion_defaults(settings, checkpoint)
    try:
        config = settings.engine_config(kv_cache_bytes(settings, device))
        engine = Engine(checkpoint.model, defaults, checkpoint.tokenizer, config)
    except ValueError as error:
        raise SetupError(str(error)) from error
    name = settings.served_model_name or path.name
    served = ServedModel(name, canvas, checkpoint.config.vocab_size, engine.max_model_len)
    logger.info(
        "serving %s from %s on %s, %s, max_model_len %d",
        name,
        path,
        device,
        dtype_choice(settings, device, dtype),
        engine.max_model_len,
    )
    return Service(AsyncEngine(engine), checkpoint.tokenizer, served, settings), Metrics(
        name, engine.max_model_len
    )
