"""AsyncEngine: the in-process `EngineClient`, the engine loop in a background thread.

The event loop never runs model work. Requests, aborts and utility calls cross into the engine
thread through a command queue; events come back through `loop.call_soon_threadsafe` into each
request's queue. `generate()` first awaits admission, so validation errors and a full queue surface
before anything is streamed. If the loop fails, every in-flight request receives the error and the
engine reports itself dead; new requests are refused with `EngineDead`.

The thread shares the GIL and the cores with the event loop; the server runs the engine in its own
process instead (`engine.core_client.EngineCoreClient`) unless told `--no-engine-process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.client import EngineDead, Event, RequestStream, stream_outputs, utility_method
from engine.config import DiffusionDefaults
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.request import FinishReason, RequestOutput, SamplingParams
from engine.snapshot import RequestsView, safe_copy
from engine.stats import EngineStats

__all__ = ["AsyncEngine", "EngineDead", "RequestStream"]  # EngineDead and RequestStream: their old home

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One request's delivery channel, owned by the event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    admitted: asyncio.Future[None] | None = None

    def deliver(self, item: Event) -> None:
        self._call(self.events.put_nowait, item)

    def settle(self, error: BaseException | None) -> None:
        assert self.admitted is not None
        self._call(settle, self.admitted, None, error)

    def _call(self, fn: Any, *args: Any) -> None:
        """Run `fn` on the stream's loop; a loop that has closed has no one left to tell."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give `future` its result, or its error; a future already done (cancelled) is left alone."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | None
    want_canvas: bool
    stream: _Stream
    lora_name: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str
    reason: FinishReason


@dataclass(frozen=True)
class _Utility:
    method: str
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[Any]


_Command = _Add | _Abort | _Utility


class AsyncEngine:
    """Runs `Engine.step()` in a daemon thread; `generate()` is an async iterator per request."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="canvas-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (in-flight requests are aborted) and join the thread."""
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def defaults(self) -> DiffusionDefaults:
        return self.engine.defaults

    @property
    def config(self) -> EngineConfig:
        return self.engine.scheduler.config

    def requests(self) -> RequestsView:
        """Read from the scheduler while the engine thread runs: copies tolerate a change meanwhile."""
        scheduler = self.engine.scheduler
        return RequestsView.of(safe_copy(lambda: scheduler.running), safe_copy(lambda: scheduler.waiting))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- requests --------------------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's events until it finishes. Cancelling the iterator aborts the request.

        Raises `InvalidParams` / `QueueFull` / `UnknownLoRA` on admission and `EngineDead` if the loop
        is down.
        """
        return stream_outputs(self, prompt_token_ids, params, request_id, want_canvas, lora_name)

    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> RequestStream:
        """Admit a request and return its event stream; raises on admission like `generate`."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = await self._submit(request_id, prompt_token_ids, params, want_canvas, lora_name)
        return RequestStream(request_id, stream.events, self.abort)

    async def _submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams | None,
        want_canvas: bool,
        lora_name: str | None,
    ) -> _Stream:
        self._check_alive()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, admitted=loop.create_future())
        self._commands.put(_Add(request_id, list(prompt), params, want_canvas, stream, lora_name))
        self._check_alive()  # the loop may have failed (and drained its commands) meanwhile
        assert stream.admitted is not None
        await stream.admitted
        return stream

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        """Abort a request in any state (thread-safe; a no-op for finished or unknown ids)."""
        self._commands.put(_Abort(request_id, reason))

    def abort_all(self) -> None:
        """Abort every in-flight request (thread-safe); each stream then ends with "abort"."""
        for request_id in list(self._streams):
            self.abort(request_id)

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Run `engine.<method>(*args)` in the engine thread between two steps; its result or error."""
        utility_method(self.engine, method)  # a bad name fails here, before the queue
        self._check_alive()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        self._commands.put(_Utility(method, args, loop, result))
        self._check_alive()
        return await result

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDead(f"the engine loop stopped: {self.error!r}")
        if self._thread is None or self._stopping:
            raise EngineDead("the engine is not running")

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    self._deliver(self.engine.step())
        except Exception as error:  # the loop must never die silently: fail every request
            logger.exception("engine loop failed")
            self.error = error
            self._fail_all(EngineDead(f"the engine loop failed: {error!r}"))
            return
        self._abort_all()
        self._refuse_pending(EngineDead("the engine is shutting down"))

    def _apply_commands(self, block: bool) -> None:
        command = self._commands.get() if block else self._poll()
        while command is not None:
            self._apply(command)
            command = self._poll()

    def _poll(self) -> _Command | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Utility):
            self._call(command)
            return
        if isinstance(command, _Abort):
            output = self.engine.abort(command.request_id, command.reason)
            if output is not None:
                self._deliver([output])
            return
        try:
            self.engine.add_request(
                command.request_id,
                command.prompt_token_ids,
                command.params,
                command.want_canvas,
                lora_name=command.lora_name,
            )
        except Exception as error:  # InvalidParams, QueueFull, UnknownLoRA: the caller raises it
            command.stream.settle(error)
            return
        self._streams[command.request_id] = command.stream
        command.stream.settle(None)

    def _call(self, command: _Utility) -> None:
        result, error = None, None
        try:
            result = utility_method(self.engine, command.method)(*command.args)
        except Exception as raised:  # the caller raises it
            error = raised
        with contextlib.suppress(RuntimeError):  # a closed loop has no one left to tell
            command.loop.call_soon_threadsafe(settle, command.result, result, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.deliver(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.deliver(error)
        self._streams.clear()
        self._refuse_pending(error)

    def _refuse_pending(self, error: BaseException) -> None:
        command = self._poll()
        while command is not None:
            if isinstance(command, _Add):
                command.stream.settle(error)
            elif isinstance(command, _Utility):
                with contextlib.suppress(RuntimeError):
                    command.loop.call_soon_threadsafe(settle, command.result, None, error)
            command = self._poll()

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            output = self.engine.abort(request_id)
            if output is not None:
                self._deliver([output])
