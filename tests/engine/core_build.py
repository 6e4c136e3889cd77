"""What an engine core process spawned by a test builds: a module-level (so picklable) function that
imports nothing heavy beyond the engine."""

from __future__ import annotations

from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.model.loader import load_checkpoint


def build_engine_at(path: str, with_tokenizer: bool = False, **config: int) -> Engine:
    """The engine of the checkpoint at `path` with these `EngineConfig` limits (no tokenizer: the API
    side detokenises, as in the server)."""
    checkpoint = load_checkpoint(path, with_tokenizer=with_tokenizer)
    return Engine(checkpoint.model, checkpoint.defaults, checkpoint.tokenizer, EngineConfig(**config))


def fail_to_build(message: str) -> Engine:
    """An engine that cannot be built (a checkpoint whose weights do not load, say)."""
    raise ValueError(message)
