"""From settings to a running service: load the checkpoint, size the cache, build the engine, and
choose where it runs.

`build_engine(settings)` is the one recipe for the engine, run in whichever process will step it:
the engine core process (the default; `engine.core_client.EngineCoreClient`, which loads the model
there while this process loads only the tokenizer and the config) or a thread of this process
(`--no-engine-process`; `engine.async_engine.AsyncEngine`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.async_engine import AsyncEngine
from engine.client import EngineClient
from engine.config import DiffusionDefaults, ModelConfig
from engine.core_client import EngineCoreClient, EngineStartError
from engine.cpu_allocator import AllocatorNotFound, resolve
from engine.data_parallel import DataParallelClient
from engine.engine import Engine
from engine.lora.peft_config import read_peft_config
from engine.model.loader import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_tokenizer,
    read_defaults,
    read_model_config,
)
from engine.prefix_affinity import affinity_for
from engine.warm_up import warm_up
from service.default_model import DEFAULT_ADAPTER_NAME, default_adapter_dir, default_model_dir
from service.metrics import Metrics
from service.served_models import Adapter, ServedModel
from service.serving import Service
from service.settings import LoRAModule, Settings

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


def check_canvas_length(settings: Settings, config: ModelConfig) -> None:
    asked = settings.diffusion_config.get("canvas_length")
    if asked is not None and int(asked) != config.canvas_length:
        raise SetupError(
            f"--diffusion-config canvas_length={asked}, but this checkpoint was trained with "
            f"{config.canvas_length}"
        )


def build_engine(settings: Settings, detokenize: bool = True) -> Engine:
    """Load the checkpoint and build the engine the settings describe; raises `SetupError`.

    Runs in the process that will step the engine. The engine core's builds it with the tokenizer
    (grammars of structured outputs compile there) but without detokenising: the API process does."""
    path = model_dir(settings)
    device, dtype = device_and_dtype(settings)
    try:
        checkpoint = load_checkpoint(path, dtype=dtype, device=device, quantization=settings.quantization)
    except CheckpointError as error:
        raise SetupError(str(error)) from error
    check_canvas_length(settings, checkpoint.config)
    defaults = diffusion_defaults(settings, checkpoint)
    try:
        config = settings.engine_config(kv_cache_bytes(settings, device))
        engine = Engine(checkpoint.model, defaults, checkpoint.tokenizer, config, detokenize=detokenize)
    except ValueError as error:
        raise SetupError(str(error)) from error
    load_lora_modules(engine, settings.lora_modules)
    if settings.compile:
        logger.info("--compile: compiling the model in a warm-up before serving")
        logger.info("--compile: warm-up done in %.1f s", warm_up(engine))
    return engine


def load_lora_modules(engine: Engine, modules: list[LoRAModule]) -> None:
    """Load the adapters of --lora-modules into `engine`; a bad one stops the start (`SetupError`)."""
    for module in modules:
        try:
            engine.add_lora(module.name, str(module.path))
        except ValueError as error:  # LoRAError: the adapter's files, shapes, targets or rank
            raise SetupError(f"--lora-modules {module.name}={module.path}: {error}") from error
        logger.info("loaded LoRA adapter %s from %s", module.name, module.path)


def with_default_adapter(settings: Settings) -> Settings:
    """The settings `canvas-serve serve` runs with: the embedded model (no MODEL_DIR) comes with its
    `sudoku-hard` adapter when that is installed or checked out, unless --lora-modules names others or
    --no-enable-lora (CANVAS_SERVE_ENABLE_LORA=0) asks for the base alone. --max-lora-rank, unless
    given, rises to the adapter's rank."""
    refused = "enable_lora" in settings.model_fields_set and not settings.enable_lora
    adapter = default_adapter_dir()
    if settings.model is not None or settings.lora_modules or refused or adapter is None:
        return settings
    update: dict[str, Any] = {
        "enable_lora": True,
        "lora_modules": [LoRAModule(name=DEFAULT_ADAPTER_NAME, path=adapter)],
    }
    if "max_lora_rank" not in settings.model_fields_set:
        update["max_lora_rank"] = max(settings.max_lora_rank, adapter_rank(adapter))
    return settings.model_copy(update=update)


def adapter_rank(folder: Path) -> int:
    """The largest rank of the PEFT adapter in `folder` (`r` and its `rank_pattern`); `LoRAError`."""
    config = read_peft_config(folder)
    return max([config.r, *config.rank_pattern.values()])


def check_adapter_names(settings: Settings, base_name: str) -> None:
    """No adapter may take the base model's served name (a request could not tell them apart)."""
    for module in settings.lora_modules:
        if module.name == base_name:
            raise SetupError(
                f"--lora-modules {module.name}: that is the base model's served name; give the adapter "
                "another name (or the base one with --served-model-name)"
            )
        if module.base_model_name not in (None, base_name):
            logger.warning(
                "--lora-modules %s: base_model_name %r is not this server's model; its parent is %s",
                module.name,
                module.base_model_name,
                base_name,
            )


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (a container's
    `cpu: "2"` limit on a 64-core node is 2, not 64)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


def engine_threads(settings: Settings) -> int:
    """torch threads of each engine core process: --engine-threads, else every usable core but one,
    which the API process keeps for HTTP, tokenisation and detokenisation, shared out among the
    `--data-parallel-size` processes (at least 1 each). On a 2-core machine that is 1: the engine's
    OpenMP workers then never wait at a barrier for a core the API process holds (bench/RESULTS.md,
    "Served vs offline")."""
    if settings.engine_threads is not None:
        return settings.engine_threads
    return max(1, (usable_cpus() - 1) // settings.data_parallel_size)


def start_engine(settings: Settings) -> tuple[EngineClient, Any, ModelConfig, int]:
    """The engine client the settings ask for, with the tokenizer, the model's config and
    max_model_len the API side needs. The engine core process loads the model; this one only reads
    the config and the tokenizer (and fails fast on a folder that cannot be served)."""
    if not settings.engine_process:
        engine = build_engine(settings)
        return AsyncEngine(engine), engine.tokenizer, engine.model.config, engine.max_model_len
    path = model_dir(settings)
    device = device_and_dtype(settings)[0]  # a device that is not there fails before any process starts
    if settings.data_parallel_size > 1 and device.type != "cpu":
        raise SetupError(
            f"--data-parallel-size {settings.data_parallel_size} puts every engine process on one device: "
            "on a GPU, use 1"
        )
    if not path.is_dir():
        raise SetupError(f"checkpoint directory {path} does not exist")
    try:
        config = read_model_config(path)
        tokenizer = load_tokenizer(path)
    except CheckpointError as error:
        raise SetupError(str(error)) from error
    check_canvas_length(settings, config)
    build = functools.partial(build_engine, settings, detokenize=False)
    cores = start_cores(settings, build, tokenizer, core_allocator(settings, device))
    client: EngineClient = (
        cores[0] if len(cores) == 1 else DataParallelClient(cores, affinity_for(cores[0].config))
    )
    return client, tokenizer, config, cores[0].max_model_len


def core_allocator(settings: Settings, device: torch.device) -> str | None:
    """The malloc library the engine core processes on `device` start with (`--cpu-allocator`; on the
    CPU only: a GPU's tensors do not come from malloc)."""
    if device.type != "cpu":
        return None
    try:
        library = resolve(settings.cpu_allocator)
    except AllocatorNotFound as error:
        raise SetupError(str(error)) from error
    logger.info("engine core allocator: %s", library or "glibc malloc")
    return library


def start_cores(
    settings: Settings, build: Callable[[], Engine], tokenizer: Any, preload: str | None
) -> list[EngineCoreClient]:
    """`--data-parallel-size` engine core processes, started one after another (each loads the model)
    with `preload` (`core_allocator`); if one cannot start, those already started are stopped."""
    threads = engine_threads(settings)
    cores: list[EngineCoreClient] = []
    try:
        for _ in range(settings.data_parallel_size):
            cores.append(EngineCoreClient(build, tokenizer, threads, settings.log_level, preload))
    except EngineStartError as error:
        for core in cores:
            core.shutdown()
        raise SetupError(str(error)) from error
    return cores


def build_service(settings: Settings) -> tuple[Service, Metrics]:
    """Build the engine (started in its own process unless `settings.engine_process` is False, but
    not yet delivering: the app's lifespan starts that), the service and the metrics."""
    settings = with_default_adapter(settings)
    name = settings.served_model_name or model_dir(settings).name
    check_adapter_names(settings, name)
    engine, tokenizer, config, max_model_len = start_engine(settings)
    device, dtype = device_and_dtype(settings)
    served = ServedModel(name, config.canvas_length, config.vocab_size, max_model_len)
    adapters = [Adapter(module.name, str(module.path)) for module in settings.lora_modules]
    processes = settings.data_parallel_size
    where = (
        "an engine thread"
        if not settings.engine_process
        else "an engine core process"
        if processes == 1
        else f"{processes} engine core processes"
    )
    logger.info(
        "serving %s from %s on %s, %s, in %s, max_model_len %d%s",
        name,
        model_dir(settings),
        device,
        dtype_choice(settings, device, dtype),
        where,
        max_model_len,
        f", LoRA adapters {[a.name for a in adapters]}" if settings.enable_lora else "",
    )
    metrics = Metrics(name, max_model_len, settings.max_loras if settings.enable_lora else None)
    return Service(engine, tokenizer, served, settings, adapters, metrics), metrics
