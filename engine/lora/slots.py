"""`LoRASlots`: `max_loras` device slots, adapters loaded on demand and evicted least recently used.

A step's adapters (at most `max_loras`: the scheduler's rule) must all be in slots during its
forward. `assign` loads each missing one into a free slot, else into the slot of the least recently
used adapter not in this step, writing every target's two rows (encoder and decoder side) and
zeroing the rows of targets the adapter leaves alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.lora.adapter import LoRAAdapter
from engine.lora.stack import LoRAStack
from engine.lora.targets import SIDES


class LoRASlots:
    """Which adapter (by load id) sits in which slot, most recently used last."""

    def __init__(self, stacks: dict[str, LoRAStack], max_loras: int) -> None:
        self.stacks = stacks
        self.max_loras = max_loras
        self.slot_of: OrderedDict[int, int] = OrderedDict()
        self.num_loads = 0
        """Adapters written into a slot so far (slot misses)."""

    def assign(self, adapters: Sequence[LoRAAdapter]) -> dict[int, int]:
        """Load id -> slot for every adapter of a step (at most `max_loras` distinct)."""
        wanted = {a.load_id: a for a in adapters}
        assert len(wanted) <= self.max_loras, (
            f"{len(wanted)} adapters in one step; max_loras={self.max_loras}"
        )
        for load_id, adapter in wanted.items():
            if load_id not in self.slot_of:
                self._load(adapter, self._free_slot(set(wanted)))
            self.slot_of.move_to_end(load_id)
        return {load_id: self.slot_of[load_id] for load_id in wanted}

    def evict(self, load_id: int) -> None:
        """Forget an adapter (unloaded): its slot is free for the next one."""
        self.slot_of.pop(load_id, None)

    def _free_slot(self, keep: set[int]) -> int:
        used = set(self.slot_of.values())
        free = [slot for slot in range(self.max_loras) if slot not in used]
        if free:
            return free[0]
        victim = next(load_id for load_id in self.slot_of if load_id not in keep)
        return self.slot_of.pop(victim)

    def _load(self, adapter: LoRAAdapter, slot: int) -> None:
        for name, stack in self.stacks.items():
            for side in SIDES:
                stack.write(side * self.max_loras + slot, adapter.weights.get((name, side)))
        self.slot_of[adapter.load_id] = slot
        self.num_loads += 1
