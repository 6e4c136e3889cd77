"""The models one server answers to: its base model and the LoRA adapters loaded on it (vLLM's
`/v1/models`, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

A request's `model` names the base (or is absent) or an adapter; `resolve` gives the engine's adapter
name (None: the base) or raises vLLM's 404. Adapters of `--lora-modules` were loaded by the engine
before the server started; `load` and `unload` change the set at run time through the engine's
utilities `add_lora`, `remove_lora` and `list_loras`, one operation per name at a time.

Unloading: the name leaves this registry first, so no new request resolves it (404), then the engine
removes it, keeping it until its last request in flight has finished; `unload` returns only once
`list_loras()` no longer names it. A 200 therefore means the adapter is gone and no request was cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from engine.client import EngineClient
from engine.lora import UnknownLoRA
from service.errors import APIError
from service.protocol import ModelCard

logger = logging.getLogger(__name__)
UNLOAD_POLL_S = (0.02, 0.05, 0.1, 0.25)
"""Waits between two `list_loras()` while an unloaded adapter finishes its requests (then the last)."""


@dataclass(frozen=True)
class ServedModel:
    """The base model as clients see it."""

    name: str
    canvas_length: int
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter being served: its name (clients' `model`) and the folder it was loaded from."""

    name: str
    path: str


class ServedModels:
    """The base model and the adapters loaded now. Runs on the event loop's thread."""

    def __init__(
        self, base: ServedModel, engine: EngineClient, adapters: list[Adapter], lora_enabled: bool
    ) -> None:
        self.base = base
        self.engine = engine
        self.lora_enabled = lora_enabled
        self._adapters = {adapter.name: adapter for adapter in adapters}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def adapter_names(self) -> list[str]:
        """The adapters requests may name now, in load order."""
        return list(self._adapters)

    def resolve(self, name: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); vLLM's 404 for any other."""
        if name is None or name == self.base.name:
            return None
        if name in self._adapters:
            return name
        raise model_not_found(name, self.base.name, self.adapter_names)

    def cards(self) -> list[ModelCard]:
        """`/v1/models`: the base, then each adapter with the base as `parent` and its folder as `root`."""
        base = ModelCard(
            id=self.base.name,
            root=self.base.name,
            max_model_len=self.base.max_model_len,
            canvas_length=self.base.canvas_length,
        )
        adapters = [
            ModelCard(
                id=adapter.name,
                root=adapter.path,
                parent=self.base.name,
                max_model_len=self.base.max_model_len,
                canvas_length=self.base.canvas_length,
            )
            for adapter in self._adapters.values()
        ]
        return [base, *adapters]

    async def load(self, name: str, path: str) -> None:
        """Load the adapter at `path` as `name` (vLLM's checks and statuses; the engine's `LoRAError`
        for a bad adapter is a 400 with its message)."""
        self._check_lora_enabled()
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.base.name:
            raise APIError(
                400, f"'{name}' is the base model's name: give the adapter a name of its own", "lora_name"
            )
        async with self._locks[name]:
            if name in self._adapters:
                raise APIError(
                    400,
                    f"The lora adapter '{name}' has already been loaded. To load it again, unload it "
                    "first (POST /v1/unload_lora_adapter).",
                    "lora_name",
                )
            if not Path(path).is_dir():
                raise APIError(404, f"Loading lora {name} failed: No adapter found for {path}", "lora_path")
            await self.engine.call_utility("add_lora", name, path)
            self._adapters[name] = Adapter(name, path)
        logger.info("loaded LoRA adapter %s from %s", name, path)

    async def unload(self, name: str) -> None:
        """Stop serving adapter `name`: refuse new requests for it at once, return once its requests in
        flight have finished and the engine has freed it."""
        self._check_lora_enabled()
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        async with self._locks[name]:
            if name not in self._adapters:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
            del self._adapters[name]
            try:
                await self.engine.call_utility("remove_lora", name)
            except UnknownLoRA:  # unloaded meanwhile by the engine itself: gone all the same
                logger.warning("LoRA adapter %s was not loaded in the engine", name)
            await self._freed(name)
        logger.info("unloaded LoRA adapter %s", name)

    async def _freed(self, name: str) -> None:
        for attempt in range(1_000_000_000):
            if name not in await self.engine.call_utility("list_loras"):
                return
            await asyncio.sleep(UNLOAD_POLL_S[min(attempt, len(UNLOAD_POLL_S) - 1)])

    def _check_lora_enabled(self) -> None:
        if not self.lora_enabled:
            raise APIError(400, "LoRA adapters are off on this server: start it with --enable-lora")


def model_not_found(name: str, base: str, adapters: list[str]) -> APIError:
    """vLLM's 404 for a `model` this server does not serve, naming the ones it does."""
    served = ", ".join(f"`{served}`" for served in [base, *adapters])
    return APIError(404, f"The model `{name}` does not exist. Served: {served}.", "model", "model_not_found")
