"""Server settings: the one place that reads the environment (prefix `CANVAS_SERVE_`).

The CLI builds a `Settings` from its flags (vLLM's names where they exist); anything not given on
the command line comes from the environment, then from the defaults below.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.cpu_allocator import CpuAllocator
from engine.engine_config import EngineConfig

SUPPORTED_SAMPLERS = ("entropy_bound",)
ENGINE_DEFAULTS = EngineConfig()
MAX_REQUEST_BODY_BYTES = 8 * 1024**2
"""The default body limit: far above any chat request, room for a batch of token-id prompts."""


Quantization = Literal["compressed-tensors", "modelopt", "modelopt_fp4", "fp8", "int8"]
"""`--quantization` values canvas-serve serves (vLLM's names)."""
QUANTIZATION_CHOICES: tuple[str, ...] = get_args(Quantization)


class LoRAModule(BaseModel):
    """One adapter to serve from the start (`--lora-modules name=path`, or vLLM's JSON form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """The name clients send as `model`."""
    path: Path
    """Folder with PEFT's adapter_config.json and adapter_model.safetensors."""
    base_model_name: str | None = None
    """Accepted for vLLM compatibility: the one base model served is always the parent."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if name != name.strip() or "," in name:
            raise ValueError(f"LoRA name {name!r}: no surrounding spaces and no commas")
        return name


class Settings(BaseSettings):
    """Everything the server can be told: CLI flags, else `CANVAS_SERVE_<FIELD>` variables, else defaults."""

    model_config = SettingsConfigDict(env_prefix="CANVAS_SERVE_", extra="forbid")

    model: Path | None = None
    """Checkpoint directory; None serves the embedded default model."""
    served_model_name: str | None = None
    """Name clients use in `model`; defaults to the checkpoint directory's name."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX-BF16, AVX512-BF16), else float32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else the CPU."""
    quantization: Quantization | None = None
    """As vLLM spells it. None: the checkpoint's own (its quantization_config), else plain; fp8 or
    int8 quantise a plain checkpoint's weights at load (int8: the CPU's answer for memory)."""

    # The engine's limits: `EngineConfig`'s names and defaults, checked by `EngineConfig` itself.
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    """Requests running (canvases in flight) at most."""
    max_num_batched_tokens: int | None = ENGINE_DEFAULTS.max_num_batched_tokens
    """Tokens per forward; None: room for max_num_seqs canvases plus a 2,048-token prefill chunk."""
    max_model_len: int | None = ENGINE_DEFAULTS.max_model_len
    """Positions per request (prompt + canvases); None: the model's max_position_embeddings."""
    max_waiting: int = ENGINE_DEFAULTS.max_waiting
    """Waiting requests at most; beyond it new requests get 429 with Retry-After."""
    block_size: int = ENGINE_DEFAULTS.block_size
    """Positions per KV cache block."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of the GPU's memory for weights plus KV cache (CUDA only)."""
    kv_cache_memory_gb: float | None = Field(None, gt=0)
    """K/V budget in GiB; None: sized from gpu_memory_utilization on CUDA, 2 GiB on the CPU."""

    generation_config: str = "auto"
    """auto: the checkpoint's generation_config.json; vllm: the reference defaults; or a folder."""
    diffusion_config: dict[str, Any] = Field(default_factory=dict)
    """canvas_length (must equal the model's) and max_denoising_steps (new default)."""
    hf_overrides: dict[str, Any] = Field(default_factory=dict)
    """diffusion_sampler (entropy_bound) and diffusion_entropy_bound are honoured."""
    attention_backend: str | None = None
    """Accepted for vLLM compatibility; the engine picks its own kernels."""
    enable_chunked_prefill: bool = True
    """Always on; accepted for vLLM compatibility."""
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    """Reuse cached K/V of shared prompt prefixes and earlier conversation turns."""
    cache_final_canvas: bool = ENGINE_DEFAULTS.cache_final_canvas
    """With prefix caching: write each ended request's last canvas into the cache (one low-priority
    causal pass), so the next turn of a conversation hits the whole answer."""
    compile: bool = ENGINE_DEFAULTS.compile
    """Run the model's layers through torch.compile (small models on the CPU step faster after a
    compilation in the first steps; needs a C++ compiler)."""

    # LoRA adapters (vLLM's names): see service/served_models.py.
    enable_lora: bool = False
    """Serve LoRA adapters beside the base model (a request picks one by `model`)."""
    lora_modules: list[LoRAModule] = Field(default_factory=list)
    """Adapters loaded at start-up; each needs --enable-lora."""
    max_loras: int = ENGINE_DEFAULTS.max_loras
    """Adapters one engine step may use (device slots); requests of further adapters wait their turn."""
    max_lora_rank: int = ENGINE_DEFAULTS.max_lora_rank
    """Largest adapter rank accepted; a larger adapter is refused when it loads."""
    max_cpu_loras: int | None = ENGINE_DEFAULTS.max_cpu_loras
    """Adapters held in host memory; None: max(max_loras, 8). Loading beyond it is refused."""
    allow_runtime_lora_updating: bool = Field(
        False,
        validation_alias=AliasChoices(
            "allow_runtime_lora_updating",
            "CANVAS_SERVE_ALLOW_RUNTIME_LORA_UPDATING",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        ),
    )
    """Let clients with access call POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
    VLLM_ALLOW_RUNTIME_LORA_UPDATING, which is read too); off, both answer 404."""

    engine_process: bool = True
    """Run the engine (scheduler, runner, model) in a process of its own, talking to this one over
    ZeroMQ, so HTTP never competes with a step for the GIL; False (`--no-engine-process`,
    CANVAS_SERVE_ENGINE_PROCESS=0): in a thread of the API process."""
    engine_threads: int | None = Field(None, ge=1)
    """torch threads of each engine process; None: every core this process may use but one, shared
    out among the engine processes."""
    cpu_allocator: CpuAllocator = "auto"
    """malloc of the engine core processes on the CPU (`engine.cpu_allocator`): `auto` preloads tcmalloc
    where installed (freed tensors stay mapped, so a step does not fault its large tensors' pages in
    again), else glibc's; `system`: glibc's; `tcmalloc`: tcmalloc, which must be installed."""
    data_parallel_size: int = Field(1, ge=1, le=64)
    """Engine core processes, each with its own copy of the model, scheduler and KV cache; a request
    runs on the one that was sent its prompt's prefix, within a load slack, else on the one with the
    fewest in flight (`engine.data_parallel`, `engine.prefix_affinity`). On the CPU, where a small
    model's step does not scale with threads, N cores of one thread each outrun one core of N threads.
    `--max-num-seqs`, `--max-waiting` and the KV cache budget are per engine process."""

    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM: stop admitting, wait this long for in-flight requests, then abort the rest."""
    canvas_min_interval_s: float = Field(0.0, ge=0)
    """Least time between two live-canvas chunks of one request (0: every step)."""
    max_prompts_per_request: int = Field(64, ge=1)
    """Prompts one /v1/completions request may carry."""
    max_n: int = Field(16, ge=1)
    """Choices (`n`) one request may ask for."""
    log_level: str = "info"
    """Python logging level of the server (and uvicorn's)."""

    # Access control and hardening (vLLM's names): see service/security.py.
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_key", "CANVAS_SERVE_API_KEY", "VLLM_API_KEY"),
    )
    """Keys a client may send as `Authorization: Bearer <key>`; none: no key is asked for. From
    --api-key (repeatable), else CANVAS_SERVE_API_KEY, else VLLM_API_KEY (one key each)."""
    api_key_file: Path | None = None
    """A file of further keys, one per line (a mounted Docker or Kubernetes secret)."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Origins whose pages may call the API (CORS); empty: same origin only; ["*"]: any."""
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"])
    """Methods allowed to those origins."""
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"])
    """Request headers allowed to those origins."""
    allow_credentials: bool = False
    """Let those origins send cookies and HTTP auth (never together with the origin "*")."""
    ssl_keyfile: Path | None = None
    """TLS private key (PEM); with ssl_certfile the server speaks HTTPS."""
    ssl_certfile: Path | None = None
    """TLS certificate chain (PEM)."""
    ssl_ca_certs: Path | None = None
    """CA certificates to verify client certificates with (see ssl_cert_reqs)."""
    ssl_cert_reqs: int = Field(int(ssl.CERT_NONE), ge=0, le=2)
    """Client certificates: 0 not asked for, 1 optional, 2 required (Python's ssl.CERT_* values)."""
    root_path: str = ""
    """The path prefix a proxy serves this server under (e.g. /canvas), for path-prefixing proxies."""
    max_request_body_bytes: int = Field(MAX_REQUEST_BODY_BYTES, ge=1)
    """Largest request body accepted; a larger one gets 413 (checked while reading, chunked or not)."""

    @field_validator("model", mode="before")
    @classmethod
    def _empty_means_default(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("hf_overrides")
    @classmethod
    def _known_sampler(cls, value: dict[str, Any]) -> dict[str, Any]:
        sampler = value.get("diffusion_sampler", "entropy_bound")
        if sampler not in SUPPORTED_SAMPLERS:
            raise ValueError(
                f"hf_overrides.diffusion_sampler={sampler!r}: only {SUPPORTED_SAMPLERS} is served"
            )
        bound = value.get("diffusion_entropy_bound")
        if bound is not None and not (isinstance(bound, int | float) and bound > 0):
            raise ValueError(f"hf_overrides.diffusion_entropy_bound={bound!r} must be a number > 0")
        return value

    @field_validator("diffusion_config")
    @classmethod
    def _known_diffusion_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - {"canvas_length", "max_denoising_steps"}
        if unknown:
            raise ValueError(f"diffusion_config keys {sorted(unknown)} are not supported")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _one_key_from_the_environment(cls, value: Any) -> Any:
        if isinstance(value, str):  # an environment variable holds one key
            return [value]
        return value

    @field_validator("api_key")
    @classmethod
    def _drop_empty_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        return [key for key in value if key.get_secret_value()]

    @field_validator("root_path")
    @classmethod
    def _root_path_shape(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError(f"root_path={value!r}: give it as /prefix (a leading slash, none at the end)")
        return value

    @model_validator(mode="after")
    def _no_wildcard_origin_with_credentials(self) -> Settings:
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError(
                "--allowed-origins '*' with --allow-credentials would let any web site act with a "
                "visitor's credentials: list the origins that may call the API, or drop --allow-credentials"
            )
        return self

    @model_validator(mode="after")
    def _tls_and_key_files(self) -> Settings:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile (or neither)")
        if self.ssl_cert_reqs and self.ssl_ca_certs is None:
            raise ValueError(
                f"--ssl-cert-reqs {self.ssl_cert_reqs} checks client certificates: give --ssl-ca-certs"
            )
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "api_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}={path}: no such file")
        if self.api_key_file is not None and not self._file_keys():  # an empty secret: open by mistake
            raise ValueError(
                f"api_key_file={self.api_key_file} holds no key: write one key per line "
                f"(e.g. openssl rand -hex 32 > {self.api_key_file})"
            )
        return self

    def api_keys(self) -> list[str]:
        """Every accepted key: the given ones, then the lines of api_key_file (blank lines skipped)."""
        return [key.get_secret_value() for key in self.api_key] + self._file_keys()

    def _file_keys(self) -> list[str]:
        if self.api_key_file is None:
            return []
        return [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]

    @model_validator(mode="after")
    def _lora_modules_need_lora(self) -> Settings:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules serves adapters: add --enable-lora")
        names = [module.name for module in self.lora_modules]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"--lora-modules names {twice} more than one adapter: give each its own name")
        for module in self.lora_modules:
            if not module.path.is_dir():
                raise ValueError(
                    f"--lora-modules {module.name}={module.path}: no such folder (it must hold PEFT's "
                    "adapter_config.json and adapter_model.safetensors)"
                )
        return self

    @model_validator(mode="after")
    def _data_parallel_needs_engine_processes(self) -> Settings:
        if self.data_parallel_size > 1 and not self.engine_process:
            raise ValueError(
                f"--data-parallel-size {self.data_parallel_size} runs that many engine processes: "
                "drop --no-engine-process"
            )
        return self

    @model_validator(mode="after")
    def _engine_limits(self) -> Settings:
        self.engine_config(kv_cache_bytes=None)  # EngineConfig's checks, before any model loads
        return self

    def engine_config(self, kv_cache_bytes: int | None) -> EngineConfig:
        """The engine's limits from these settings, with the K/V budget the host affords."""
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting=self.max_waiting,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            kv_cache_bytes=kv_cache_bytes,
            enable_prefix_caching=self.enable_prefix_caching,
            cache_final_canvas=self.cache_final_canvas,
            compile=self.compile,
            enable_lora=self.enable_lora,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
        )
