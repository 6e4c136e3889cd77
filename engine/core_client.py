"""`EngineCoreClient`: the API side of an engine core process (the server's default `EngineClient`).

The engine (scheduler, runner, model) runs in a process of its own (`engine.core_process`, running
`engine.core.run_engine_core`), so the API's event loop (HTTP, JSON, SSE, tokenisation,
detokenisation) never holds the GIL or a core the engine's step needs, and the engine never waits on
HTTP (vLLM V1's split, for the same reason). They talk over two ZeroMQ sockets on IPC endpoints in a
private temporary folder: requests, aborts and utility calls go down a PUSH socket, `CoreOutputs`
come back on a PULL socket that one asyncio task reads; `engine.ipc.Codec` encodes both ways.

Here live what the API side owns: one queue per request, the request's incremental detokeniser
(the engine core sends token ids only), the mirror of the core's statistics (`stats`, merged from
its snapshots, read by the metrics layer as a live `EngineStats`), and the latest request summaries
for the engine view.

Engine death: the process's sentinel is watched on the event loop; when the process exits (killed,
crashed, or after `CoreFailed`) every open stream and pending admission ends with `EngineDead`,
`is_alive` turns False (so /ready and generation answer 503) and new requests are refused.
Call everything from the event loop's thread, except `abort`, which may come from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
import zmq.asyncio

from engine.client import EngineDead, Event, RequestStream, stream_outputs
from engine.config import DiffusionDefaults
from engine.core import CoreLaunch
from engine.core_process import CoreProcess, EngineStartError
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.ipc import Codec
from engine.messages import (
    CODEC_ROOTS,
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreOutputs,
    UtilityCall,
)
from engine.request import FinishReason, InvalidParams, RequestOutput, SamplingParams
from engine.snapshot import RequestsView, merge_stats
from engine.stats import EngineStats

__all__ = ["EngineCoreClient", "EngineStartError"]  # EngineStartError: for the service's import

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 0.2
"""After the process exits, how long its last messages (final outputs, `CoreFailed`) may still arrive."""


@dataclass
class _Stream:
    """One request's state on the API side."""

    detokenizer: IncrementalDetokenizer
    admitted: asyncio.Future[None]
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


class EngineCoreClient:
    """Starts an engine core process and serves `EngineClient` over ZeroMQ (see the module docstring).

    The constructor blocks until the engine is built (the model loaded), raising `EngineStartError`
    if it cannot be; `start()` then begins reading outputs on the running event loop.
    """

    def __init__(
        self,
        build: Callable[[], Engine],
        tokenizer: Any,
        num_threads: int,
        log_level: str = "INFO",
        preload: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.codec = Codec(CODEC_ROOTS)
        self._folder = tempfile.mkdtemp(prefix="canvas-serve-")
        self._context = zmq.asyncio.Context()
        self._input = self._bind(zmq.PUSH, "input")
        self._output = self._bind(zmq.PULL, "output")
        # Closes the channel once: at shutdown, or when a client that was never shut down is collected.
        # Left to pyzmq's own Context.__del__, a client in a reference cycle hangs the collector: the
        # cycle's weak references are cleared first, so the context cannot see its open sockets and
        # `term()` waits for them forever.
        self._closer = weakref.finalize(
            self, _close_channel, self._context, (self._input, self._output), self._folder
        )
        launch = CoreLaunch(
            build, self._address("input"), self._address("output"), num_threads, os.getpid(), log_level
        )
        try:
            self.process = CoreProcess(launch, preload)
        except BaseException:
            self._close_sockets()
            raise
        self._ready = self.process.ready
        self.stats = EngineStats()
        """A mirror of the core's statistics, brought up to date by each snapshot it ships."""
        self._requests = RequestsView()
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending_sends: set[asyncio.Future[Any]] = set()
        self._closing = False
        self.error: BaseException | None = None

    def _address(self, name: str) -> str:
        return f"ipc://{self._folder}/{name}"

    def _bind(self, kind: int, name: str) -> zmq.asyncio.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)  # never drop a message
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self._address(name))
        return socket

    # -- what the engine said at start-up ---------------------------------------------------------

    @property
    def defaults(self) -> DiffusionDefaults:
        return self._ready.defaults

    @property
    def config(self) -> EngineConfig:
        return self._ready.config

    @property
    def max_model_len(self) -> int:
        return self._ready.max_model_len

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin reading the core's outputs and watching its process (on the running event loop)."""
        if self._reader is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._reader = self._loop.create_task(self._read(), name="engine-core-outputs")
        self._loop.add_reader(self.process.sentinel, self._on_process_exit)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (SIGTERM: it aborts what runs and exits), fail what is left, release the IPC."""
        if self._closing:
            return
        self._closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.process.sentinel)
        self.process.stop(timeout)
        self._die(EngineDead("the engine is shutting down"))
        if self._reader is not None:
            self._reader.cancel()
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._closer()

    @property
    def started(self) -> bool:
        return self._reader is not None

    @property
    def is_alive(self) -> bool:
        return (
            self._reader is not None and self.error is None and not self._closing and self.process.is_alive()
        )

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def requests(self) -> RequestsView:
        """The running and waiting requests as of the core's last summary (at most ~0.1 s old)."""
        return self._requests

    # -- requests --------------------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes; closing the iterator aborts it."""
        return stream_outputs(self, prompt_token_ids, params, request_id, want_canvas, lora_name)

    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_canvas: bool = False,
        lora_name: str | None = None,
    ) -> RequestStream:
        """Admit a request and return its event stream; raises what the core's admission raised
        (`UnknownLoRA` for a `lora_name` the core has not loaded)."""
        self._check_alive()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise InvalidParams(f"request id {request_id!r} is already in use")
        stream = _Stream(IncrementalDetokenizer(self.tokenizer), asyncio.get_running_loop().create_future())
        self._streams[request_id] = stream
        self._post(
            AddRequest(request_id, list(prompt_token_ids), params, want_canvas, time.monotonic(), lora_name)
        )
        try:
            await stream.admitted
        except asyncio.CancelledError:  # the caller left: the core may admit it still
            self._streams.pop(request_id, None)
            self._post(AbortRequests([request_id]))
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return RequestStream(request_id, stream.events, self.abort)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        """Abort a request in any state (a no-op for finished or unknown ids); any thread."""
        self._post(AbortRequests([request_id], reason))

    def abort_all(self) -> None:
        """Abort every in-flight request; each stream then ends with "abort"."""
        if self._streams:
            self._post(AbortRequests(list(self._streams)))

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Run the engine's public method `method(*args)` in the core, between two steps."""
        self._check_alive()
        call_id = next(self._call_ids)
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = result
        self._post(UtilityCall(call_id, method, list(args)))
        try:
            return await result
        finally:
            self._calls.pop(call_id, None)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDead(f"the engine core stopped: {self.error}")
        if self._reader is None or self._closing:
            raise EngineDead("the engine is not running")
        if not self.process.is_alive():
            raise EngineDead(f"the engine process {self.process.exit_text()}")

    def _post(self, message: AddRequest | AbortRequests | UtilityCall) -> None:
        """Send a command to the core, from the loop's thread (hopping there from any other)."""
        if self._loop is None or self._closing:
            return
        data = self.codec.encode(message)
        if threading.get_ident() == self._loop_thread:
            self._send(data)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: nothing is left to abort
                self._loop.call_soon_threadsafe(self._send, data)

    def _send(self, data: bytes) -> None:
        sent = asyncio.ensure_future(self._input.send(data, copy=False))
        if not sent.done():  # the core has not connected yet: keep the future until it goes
            self._pending_sends.add(sent)
            sent.add_done_callback(self._pending_sends.discard)

    # -- what the core sends ---------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                message = self.codec.decode(await self._output.recv(copy=True))
                if isinstance(message, CoreFailed):
                    self._die(EngineDead(message.message))
                    return
                self._apply(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug here would hang every request: fail them instead
            logger.exception("reading the engine core's outputs failed")
            self._die(EngineDead(f"the engine client failed: {error!r}"))

    def _apply(self, message: CoreOutputs) -> None:
        if message.snapshot is not None:
            merge_stats(self.stats, message.snapshot.stats)
            if message.snapshot.requests is not None:
                self._requests = message.snapshot.requests
        for admission in message.admissions:
            stream = self._streams.get(admission.request_id)
            if stream is None or stream.admitted.done():
                continue
            if admission.error is None:
                stream.admitted.set_result(None)
            else:
                del self._streams[admission.request_id]
                stream.admitted.set_exception(admission.error.exception())
        for output in message.outputs:
            self._deliver(output)
        for result in message.results:
            future = self._calls.get(result.call_id)
            if future is None or future.done():
                continue
            if result.error is None:
                future.set_result(result.result)
            else:
                future.set_exception(result.error.exception())

    def _deliver(self, output: RequestOutput) -> None:
        """Into the request's queue, with its text (detokenised here, not in the core)."""
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.new_token_ids or output.finished:
            text = stream.detokenizer.push(output.new_token_ids, output.finished)
            if text:
                output = replace(output, new_text=text)
        stream.events.put_nowait(output)
        if output.finished:
            del self._streams[output.request_id]

    # -- engine death ----------------------------------------------------------------------------

    def _on_process_exit(self) -> None:
        """The process is gone: give its last messages a moment to arrive, then fail what is left."""
        assert self._loop is not None
        self._loop.remove_reader(self.process.sentinel)
        self.process.reap()
        if self._closing:
            return
        error = EngineDead(f"the engine process {self.process.exit_text()}")
        logger.error("%s: failing %d in-flight requests", error, len(self._streams))
        self._loop.call_later(EXIT_GRACE_S, self._die, error)

    def _die(self, error: BaseException) -> None:
        """Fail every pending admission, open stream and utility call with `error` (once)."""
        if self.error is None:
            self.error = error
        for stream in self._streams.values():
            if not stream.admitted.done():
                stream.admitted.set_exception(error)
            stream.events.put_nowait(error)
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()


def _close_channel(
    context: zmq.asyncio.Context, sockets: tuple[zmq.asyncio.Socket, ...], folder: str
) -> None:
    """Close the sockets without lingering, then the context, then remove the sockets' folder."""
    for socket in sockets:
        socket.close(linger=0)
    context.term()
    shutil.rmtree(folder, ignore_errors=True)
