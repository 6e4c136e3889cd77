"""`LoRARegistry`: the adapters held in host memory, by name, with their requests in flight.

An adapter is `loaded` from `add` until it is freed. `remove` frees an adapter with no request in
flight at once; one with requests in flight becomes `unloading`: no new request may use it (they get
`UnknownLoRA`), its name stays listed, and it is freed when its last request finishes (`release`).
So "unloaded" is exactly "no longer in `names()`". At most `max_cpu_loras` adapters are held; adding
beyond that is refused (`LoRAError`), since an adapter a client loaded by name must not vanish.
"""

from __future__ import annotations

from collections import Counter

from engine.lora.adapter import LoRAAdapter
from engine.lora.errors import LoRAError, UnknownLoRA


class LoRARegistry:
    """Loaded adapters by name and by load id; in-flight counts by load id."""

    def __init__(self, max_cpu_loras: int) -> None:
        self.max_cpu_loras = max_cpu_loras
        self.by_name: dict[str, LoRAAdapter] = {}
        self.by_id: dict[int, LoRAAdapter] = {}
        self.in_flight: Counter[int] = Counter()
        self.unloading: set[int] = set()

    def names(self) -> list[str]:
        """Every adapter held (unloading ones too, until freed), sorted."""
        return sorted(self.by_name)

    def check_can_add(self, name: str) -> None:
        """`LoRAError` unless an adapter named `name` may be added now."""
        held = self.by_name.get(name)
        if held is not None and held.load_id in self.unloading:
            raise LoRAError(
                f"adapter {name!r} is being unloaded ({self.in_flight[held.load_id]} requests in flight): "
                "add it again once it is no longer listed"
            )
        if held is not None:
            raise LoRAError(
                f"an adapter named {name!r} is already loaded: unload it first or pick another name"
            )
        if len(self.by_name) >= self.max_cpu_loras:
            raise LoRAError(
                f"{len(self.by_name)} adapters are loaded, the most max_cpu_loras={self.max_cpu_loras} "
                "allows: unload one or raise max_cpu_loras"
            )

    def add(self, adapter: LoRAAdapter) -> None:
        self.check_can_add(adapter.name)
        self.by_name[adapter.name] = adapter
        self.by_id[adapter.load_id] = adapter

    def acquire(self, name: str) -> LoRAAdapter:
        """The adapter a new request names, counted in flight; `UnknownLoRA` if none may be used."""
        adapter = self.by_name.get(name)
        if adapter is None or adapter.load_id in self.unloading:
            why = "is being unloaded" if adapter is not None else "is not loaded"
            loaded = ", ".join(n for n in self.names() if self.by_name[n].load_id not in self.unloading)
            raise UnknownLoRA(f"LoRA adapter {name!r} {why} (loaded: {loaded or 'none'})")
        self.in_flight[adapter.load_id] += 1
        return adapter

    def release(self, load_id: int) -> LoRAAdapter | None:
        """One request of `load_id` finished; the adapter if that freed it (it was unloading)."""
        self.in_flight[load_id] -= 1
        if self.in_flight[load_id] > 0:
            return None
        del self.in_flight[load_id]
        return self._free(load_id) if load_id in self.unloading else None

    def remove(self, name: str) -> LoRAAdapter | None:
        """Unload `name`: the adapter if freed now, None if it waits for its requests in flight."""
        adapter = self.by_name.get(name)
        if adapter is None or adapter.load_id in self.unloading:
            raise UnknownLoRA(
                f"LoRA adapter {name!r} is not loaded" + (" (already unloading)" if adapter else "")
            )
        if self.in_flight[adapter.load_id] > 0:
            self.unloading.add(adapter.load_id)
            return None
        return self._free(adapter.load_id)

    def _free(self, load_id: int) -> LoRAAdapter:
        adapter = self.by_id.pop(load_id)
        del self.by_name[adapter.name]
        self.unloading.discard(load_id)
        return adapter
