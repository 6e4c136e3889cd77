"""`EngineConfig`: the one holder of an engine's limits (no torch).

The engine, its scheduler, offline `generate()`, the server's `Settings` and the benchmarks all take
these names and defaults from here, and `batched_tokens_for` is the one sizing of
`max_num_batched_tokens`. Limits that depend on the model (`max_model_len`, `max_num_batched_tokens`)
may be left None; `EngineConfig.resolve` fills them in once the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_PREFILL_CHUNK = 2048
"""Prompt tokens a step has room for beside every running canvas when the budget is sized for us."""


def batched_tokens_for(
    max_num_seqs: int, canvas_length: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
) -> int:
    """A token budget per forward in which every running canvas denoises in every step and a prompt
    chunk of `prefill_chunk` tokens still fits. Example: 16 canvases of 256 and a chunk of 2,048: 6,144."""
    return max_num_seqs * canvas_length + prefill_chunk


@dataclass(frozen=True)
class EngineConfig:
    """How one engine uses its model and memory. Every field has a serving default; checked on creation."""

    max_num_seqs: int = 16
    """Canvases in flight at most (running requests)."""
    max_num_batched_tokens: int | None = None
    """Tokens per forward: prefill chunks, commits and canvas_length per denoised canvas. None:
    `batched_tokens_for(max_num_seqs, canvas_length)`, room for every canvas plus a 2,048-token chunk."""
    max_waiting: int = 1024
    """Bound of the waiting queue; beyond it requests are refused (`QueueFull`, HTTP 429)."""
    max_model_len: int | None = None
    """Positions per request (prompt + every canvas); None: the model's max_position_embeddings."""
    block_size: int = 16
    """Positions per KV cache block."""
    num_full_blocks: int | None = None
    """Blocks of the full-attention cache group; None: enough for max_num_seqs requests of
    max_model_len, unless `kv_cache_bytes` caps it."""
    kv_cache_bytes: int | None = None
    """Total K/V budget in bytes across cache groups; None: no cap (see `num_full_blocks`)."""
    enable_prefix_caching: bool = True
    """Reuse the K/V of cached full blocks whose token ids (and everything before them) match: shared
    prompts and earlier conversation turns are computed once (see `engine.prefix_cache`)."""
    cache_final_canvas: bool = True
    """With prefix caching: write an ended request's last canvas (up to what a client's next prompt
    repeats) into the cache in one low-priority causal pass, so the next turn of a conversation hits
    the whole answer (`engine.cache_tail`). Off saves that pass where no prompt repeats an answer."""
    enable_lora: bool = False
    """Serve LoRA adapters beside the base model (`Engine.add_lora`, `engine.lora`). Off: no LoRA code
    runs and adapters are refused."""
    max_loras: int = 1
    """Adapters usable in one step (device slots); the base model needs none."""
    max_lora_rank: int = 16
    """The highest adapter rank accepted (the slots are sized for it)."""
    max_cpu_loras: int | None = None
    """Adapters held in host memory at most; adding beyond it is refused. None: max(max_loras, 8)."""
    compile: bool = False
    """Run the layer stack through `torch.compile` (`engine.model.compiled`): fewer, fused ops per layer
    for small models on the CPU, after a compilation in the first steps."""
    guided_pin_skeleton: bool = True
    """Grammar-constrained requests pin the text their grammar forces at each canvas's start
    (`engine.guided_denoise`)."""
    guided_renoise: bool = False
    """Grammar-constrained requests re-noise, after each step, the first accepted token their grammar
    refuses (`engine.guided_denoise`)."""

    def __post_init__(self) -> None:
        _check_min("max_num_seqs", self.max_num_seqs, 1)
        _check_min("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_min("max_waiting", self.max_waiting, 0)
        _check_min("max_model_len", self.max_model_len, 1)
        _check_min("block_size", self.block_size, 1)
        _check_min("num_full_blocks", self.num_full_blocks, 1)
        _check_min("kv_cache_bytes", self.kv_cache_bytes, 0)
        _check_min("max_loras", self.max_loras, 1)
        _check_min("max_lora_rank", self.max_lora_rank, 1)
        _check_min("max_cpu_loras", self.max_cpu_loras, self.max_loras)

    def resolve(self, canvas_length: int, max_position_embeddings: int) -> EngineConfig:
        """A copy with `max_model_len` and `max_num_batched_tokens` set for a model with these shapes.

        Raises ValueError when the budget cannot hold one canvas (no request could ever denoise).
        """
        batched = self.max_num_batched_tokens or batched_tokens_for(self.max_num_seqs, canvas_length)
        if batched < canvas_length:
            raise ValueError(
                f"max_num_batched_tokens={batched} cannot hold one canvas of {canvas_length} tokens: raise it"
            )
        max_model_len = self.max_model_len or max_position_embeddings
        return replace(self, max_num_batched_tokens=batched, max_model_len=max_model_len)

    @property
    def resolved_max_cpu_loras(self) -> int:
        """`max_cpu_loras`, or its default max(max_loras, 8)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 8)

    @property
    def resolved_max_model_len(self) -> int:
        """`max_model_len` of a resolved config (raises on one that `resolve` has not filled in)."""
        return _resolved("max_model_len", self.max_model_len)

    @property
    def resolved_max_num_batched_tokens(self) -> int:
        """`max_num_batched_tokens` of a resolved config (raises on one that `resolve` has not filled in)."""
        return _resolved("max_num_batched_tokens", self.max_num_batched_tokens)


def _check_min(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def _resolved(name: str, value: int | None) -> int:
    if value is None:
        raise ValueError(f"EngineConfig.{name} is unset: call EngineConfig.resolve(...) first")
    return value
