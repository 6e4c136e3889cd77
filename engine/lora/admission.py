"""Which waiting request may start running under the `max_loras` rule (no torch).

The running requests use at most `max_loras` distinct adapters (the base needs none), so every step,
a subset of them, fits the device slots. A waiting request whose adapter is new while the running set
already uses `max_loras` is held back; requests behind it may pass it (their adapter is running, or
they use the base), but each held-back request is passed at most `max_passes` times: then admission
stops behind it until its adapter fits (running requests finish, their adapters leave the set), so no
request starves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.request import Request


def lora_cache_key(load_id: int) -> str:
    """`Request.cache_key` of an adapter's requests: its per-load id, so a reloaded adapter of the same
    name never reads the old one's cached blocks."""
    return f"lora-{load_id}"


def running_adapters(running: Iterable[Request]) -> set[int]:
    return {r.lora_id for r in running if r.lora_id is not None}


def fits(request: Request, adapters: set[int], max_loras: int) -> bool:
    """The request may run beside running requests using `adapters`."""
    return request.lora_id is None or request.lora_id in adapters or len(adapters) < max_loras


@dataclass(frozen=True)
class Pick:
    """The request to admit and the held-back requests it passes (count them once it is admitted)."""

    request: Request
    passed: list[Request] = field(default_factory=list)

    def admitted(self) -> None:
        for request in self.passed:
            request.num_lora_passes += 1


def pick_admissible(
    waiting: Iterable[Request], running: Iterable[Request], max_loras: int, max_passes: int
) -> Pick | None:
    """The first waiting request that fits, unless a held-back one before it was passed `max_passes`
    times already; None when no request may start."""
    adapters = running_adapters(running)
    held_back: list[Request] = []
    for request in waiting:
        if fits(request, adapters, max_loras):
            return Pick(request, held_back)
        if request.num_lora_passes >= max_passes:
            return None
        held_back.append(request)
    return None
