"""Server settings: the one place that reads the environment (prefix `CANVAS_SERVE_`).

The CLI builds a `Settings` from its flags (vLLM's names where they exist); anything not given on
the command line comes from the environment, then from the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SUPPORTED_SAMPLERS = ("entropy_bound",)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANVAS_SERVE_", extra="forbid")

    model: Path | None = None
    """Checkpoint directory; None serves the embedded default model."""
    served_model_name: str | None = None
    """Name clients use in `model`; defaults to the checkpoint directory's name."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on the CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"

    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """None: room for max_num_seqs canvases plus a 2,048-token prefill chunk."""
    max_model_len: int | None = Field(None, ge=1)
    max_num_queued_reqs: int = Field(256, ge=0)
    """Waiting requests at most; beyond it new requests get 429 with Retry-After."""
    block_size: int = Field(16, ge=1)
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

    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM: stop admitting, wait this long for in-flight requests, then abort the rest."""
    canvas_min_interval_s: float = Field(0.0, ge=0)
    """Least time between two live-canvas chunks of one request (0: every step)."""
    max_prompts_per_request: int = Field(64, ge=1)
    max_n: int = Field(16, ge=1)
    log_level: str = "info"

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
