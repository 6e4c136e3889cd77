"""`LoRAManager`: what the engine and the runner ask of LoRA, on one model.

The engine: `add` / `remove` / `names` (its `add_lora` / `remove_lora` / `list_loras`), `acquire` an
adapter for a new request and `release` it when the request ends (an unloading adapter is freed
with its last request). The runner: `bind(segments, load_ids)` around each forward puts the step's
adapters in device slots and sets the wrappers' `LoRAIndex`; a step without adapters binds nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from engine.attention.types import Segment
from engine.lora.adapter import LoRAAdapter, read_adapter
from engine.lora.index import build_index
from engine.lora.methods import enable_lora
from engine.lora.registry import LoRARegistry
from engine.lora.slots import LoRASlots
from engine.lora.targets import model_targets
from engine.model.diffusion_gemma import DiffusionGemma

_load_ids = itertools.count(1)
"""Per-load ids, unique in this process (prefix cache keys; a reload never reuses one)."""


class LoRAManager:
    """LoRA on one model: the host registry, the device slots and the forward's context."""

    def __init__(self, model: DiffusionGemma, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.targets = model_targets(model)
        self.context, stacks = enable_lora(model, self.targets, max_loras, max_lora_rank)
        self.device = model.embed_tokens.weight.device
        self.registry = LoRARegistry(max_cpu_loras)
        self.slots = LoRASlots(stacks, max_loras)

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read, check and hold the adapter at `path` as `name`; `LoRAError` naming what is wrong."""
        self.registry.check_can_add(name)
        adapter = read_adapter(name, path, next(_load_ids), self.targets, self.max_lora_rank)
        self.registry.add(adapter)
        return adapter

    def remove(self, name: str) -> bool:
        """Unload `name`: True if freed now, False if it waits for its requests in flight."""
        freed = self.registry.remove(name)
        if freed is not None:
            self.slots.evict(freed.load_id)
        return freed is not None

    def names(self) -> list[str]:
        return self.registry.names()

    def acquire(self, name: str) -> LoRAAdapter:
        return self.registry.acquire(name)

    def release(self, load_id: int) -> None:
        freed = self.registry.release(load_id)
        if freed is not None:
            self.slots.evict(freed.load_id)

    @contextmanager
    def bind(self, segments: Sequence[Segment], load_ids: Sequence[int | None]) -> Iterator[None]:
        """Within the block, the model's LoRA layers apply segment i's adapter `load_ids[i]` (None:
        the base); the step's adapters are in slots."""
        adapters = [self.registry.by_id[i] for i in dict.fromkeys(load_ids) if i is not None]
        if not adapters:
            yield
            return
        slot_of = self.slots.assign(adapters)
        slots = [None if i is None else slot_of[i] for i in load_ids]
        self.context.index = build_index(segments, slots, self.max_loras, self.device)
        try:
            yield
        finally:
            self.context.index = None
