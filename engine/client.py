"""`EngineClient`: what the API side asks of an engine, wherever it runs.

Two implementations: `engine.async_engine.AsyncEngine` steps the engine in a thread of this process
(tests, benchmarks, `--no-engine-process`), and `engine.core_client.EngineCoreClient` talks to an
engine core process over ZeroMQ (the server's default). The service holds an `EngineClient` and never
knows which.

Contract of both: `generate()` / `submit()` first await admission (so `InvalidParams`, `QueueFull`
and `EngineDead` surface before anything is streamed), then yield `RequestOutput`s with their text
(`new_text`) until one is finished; closing the stream aborts the request. Once the engine is down
(its loop failed, its process died, or it was shut down) `is_alive` is False, every open stream ends
with `EngineDead`, and new requests are refused with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from engine.config import DiffusionDefaults
from engine.engine_config import EngineConfig
from engine.request import RequestOutput, SamplingParams
from engine.snapshot import RequestsView
from engine.stats import EngineStats

Event = RequestOutput | BaseException
"""What a request's queue holds: its next output, or the error that ends it."""


class EngineDead(RuntimeError):
    """The engine stopped (its loop failed, its process died, or it shut down); the server answers 503."""


class UtilityError(RuntimeError):
    """A utility call named no public method of the engine."""


class RequestStream:
    """One admitted request's events; `aclose()` aborts it unless it already finished."""

    def __init__(self, request_id: str, events: asyncio.Queue[Event], abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._events = events
        self._abort = abort
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._events.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)


class EngineClient(Protocol):
    """The engine as the service sees it (see the module docstring for the contract)."""

    @property
    def defaults(self) -> DiffusionDefaults:
        """The sampler defaults requests are resolved against."""
        ...

    @property
    def config(self) -> EngineConfig:
        """The engine's limits, resolved against its model."""
        ...

    @property
    def stats(self) -> EngineStats:
        """Statistics for the metrics layer: the live object, or a mirror of the shipped snapshots."""
        ...

    @property
    def started(self) -> bool: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished (what a drain waits for)."""
        ...

    def start(self) -> None:
        """Start delivering (called once the event loop runs)."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; in-flight requests end with "abort"."""

    def requests(self) -> RequestsView:
        """The running and waiting requests, for the engine view."""
        ...

    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> RequestStream:
        """Admit a request and return its event stream (raises on admission, as `generate`).

        `lora_name` picks a loaded adapter (None: the base model); an unknown one raises `UnknownLoRA`."""
        ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """A request's outputs until it finishes; closing the iterator aborts it."""
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request in any state (a no-op for finished or unknown ids)."""

    def abort_all(self) -> None:
        """Abort every in-flight request; each stream then ends with "abort"."""

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Run the engine's public method `method(*args)` between two steps and return its result
        (for admin operations, e.g. `reset_prefix_cache`). Raises `UtilityError` for a name that is no
        public method, `EngineDead` when the engine is down, and whatever the method raised."""
        ...


async def stream_outputs(
    client: EngineClient,
    prompt_token_ids: list[int],
    params: SamplingParams | None,
    request_id: str | None,
    want_canvas: bool,
    lora_name: str | None = None,
) -> AsyncIterator[RequestOutput]:
    """`EngineClient.generate` for every client: submit (admission errors raise on the first
    iteration), yield the request's outputs, and abort it if the iterator is closed early."""
    stream = await client.submit(prompt_token_ids, params, request_id, want_canvas, lora_name=lora_name)
    try:
        async for event in stream:
            yield event
    finally:
        await stream.aclose()


def utility_method(target: object, method: str) -> Callable[..., Any]:
    """`target`'s public method `method`, or `UtilityError` naming what is wrong."""
    if method.startswith("_"):
        raise UtilityError(f"{method!r} is private: only public engine methods may be called")
    found = getattr(target, method, None)
    if not callable(found):
        raise UtilityError(f"the engine has no method {method!r}")
    return found  # type: ignore[no-any-return]
