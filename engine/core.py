"""The engine core process: scheduler, runner and model, stepping with no HTTP in the way.

`run_engine_core` is the process's entry point (started with the 'spawn' method by
`engine.core_client.EngineCoreClient`): it sizes torch's threads, builds the engine, reports
`EngineReady` (or `CoreFailed`) on the start-up pipe, then runs `EngineCore.run()`.

The loop: take every command waiting on the input socket (blocking only while the engine has
nothing to do), step the engine once, send one `CoreOutputs` with what the turn produced. Commands
are applied between steps, so an abort frees its blocks before the next step.
The core ships an `EngineSnapshot` with every turn that admitted, finished or aborted a request, at
least every `SNAPSHOT_INTERVAL_S` while busy, and when it goes idle; the request summaries ride
along at most every interval (and on idle), since they cost more than the counters.

It ends on `SIGTERM` (in-flight requests end with "abort"), when its parent process is gone (it is
never left behind by a killed server), or when its loop raises (`CoreFailed`, then exit code 1).
`SIGINT` is ignored: Ctrl-C in a terminal reaches the whole process group, and the API process
decides when the engine stops (after its drain).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import torch
import zmq

from engine.client import utility_method
from engine.engine import Engine
from engine.ipc import Codec
from engine.messages import (
    CODEC_ROOTS,
    AbortRequests,
    AddRequest,
    Admission,
    CoreFailed,
    CoreOutputs,
    EngineReady,
    RemoteError,
    UtilityCall,
    UtilityResult,
)
from engine.request import RequestOutput
from engine.snapshot import EngineSnapshot, RequestsView, take_stats

logger = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.1
IDLE_POLL_MS = 500
"""How long an idle core waits for a command before it checks on its parent again."""


@dataclass(frozen=True)
class CoreLaunch:
    """What the spawned process is given (pickled): how to build its engine and where to talk."""

    build: Callable[[], Engine]
    """Builds the engine in the core process (a picklable callable: a module-level function or a
    `functools.partial` of one)."""
    input_address: str
    output_address: str
    num_threads: int
    """torch intra-op threads of the core."""
    parent_pid: int
    log_level: str = "INFO"


def run_engine_core(launch: CoreLaunch, ready: Connection) -> None:
    """The engine core process's main function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=launch.log_level.upper(), format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s"
    )
    torch.set_num_threads(launch.num_threads)
    try:
        engine = launch.build()
    except Exception as error:  # reported to the API process, which refuses to start
        ready.send(CoreFailed(str(error) or repr(error)))
        ready.close()
        raise SystemExit(1) from None
    ready.send(EngineReady(engine.scheduler.config, engine.defaults, engine.max_model_len))
    ready.close()
    logger.info("engine core ready (pid %d, %d torch threads)", os.getpid(), torch.get_num_threads())
    core = EngineCore(engine, launch.input_address, launch.output_address, launch.parent_pid)
    signal.signal(signal.SIGTERM, core.stop)
    raise SystemExit(core.run())


@dataclass
class _Turn:
    """What one loop turn has to report."""

    admissions: list[Admission] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    results: list[UtilityResult] = field(default_factory=list)
    changed: bool = False
    """A request was admitted, aborted or finished: the counters must follow at once."""


class EngineCore:
    """Runs one engine behind a PULL socket (commands) and a PUSH socket (outputs)."""

    def __init__(
        self,
        engine: Engine,
        input_address: str,
        output_address: str,
        parent_pid: int | None = None,
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self.codec = Codec(CODEC_ROOTS)
        self.parent_pid = parent_pid
        self.snapshot_interval_s = snapshot_interval_s
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PULL)
        self._input.connect(input_address)
        self._output = self._context.socket(zmq.PUSH)
        self._output.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
        self._output.setsockopt(zmq.LINGER, 5000)  # the last words still leave on exit
        self._output.connect(output_address)
        self._stopping = False
        self._last_snapshot = 0.0
        self._last_rows = 0.0

    def stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Stop after the current step (a signal handler, or a plain call)."""
        self._stopping = True

    def run(self) -> int:
        """Serve until stopped or orphaned; the exit code (0, or 1 after a failure)."""
        try:
            self._loop()
        except Exception as error:  # the loop must never die silently: the API side fails every request
            logger.exception("engine core failed")
            self._send(CoreFailed(f"the engine core failed: {error!r}"))
            return 1
        finally:
            self._close()
        return 0

    def _loop(self) -> None:
        while not self._stopping and self._parent_alive():
            busy = self.engine.has_unfinished()
            turn = _Turn()
            self._take_commands(turn, timeout_ms=0 if busy else IDLE_POLL_MS)
            if self.engine.has_unfinished() and not self._stopping:
                outputs = self.engine.step()
                turn.outputs += outputs
                turn.changed |= any(o.finished for o in outputs)
            went_idle = busy and not self.engine.has_unfinished()
            self._report(turn, went_idle)
        self._abort_all()

    def _parent_alive(self) -> bool:
        return self.parent_pid is None or os.getppid() == self.parent_pid

    # -- commands --------------------------------------------------------------------------------

    def _take_commands(self, turn: _Turn, timeout_ms: int) -> None:
        if not self._input.poll(timeout_ms):
            return
        while True:
            try:
                data = self._input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply(self.codec.decode(data), turn)

    def _apply(self, command: Any, turn: _Turn) -> None:
        if isinstance(command, AddRequest):
            turn.admissions.append(self._admit(command))
            turn.changed = True
        elif isinstance(command, AbortRequests):
            for request_id in command.request_ids:
                output = self.engine.abort(request_id)
                if output is not None:
                    turn.outputs.append(output)
                    turn.changed = True
        elif isinstance(command, UtilityCall):
            turn.results.append(self._call(command))
            turn.changed = True
        else:
            raise TypeError(f"the engine core got an unexpected {type(command).__name__}")

    def _admit(self, command: AddRequest) -> Admission:
        try:
            self.engine.add_request(
                command.request_id,
                command.prompt_token_ids,
                command.params,
                command.want_canvas,
                command.arrival_time,
                command.lora_name,
            )
        except Exception as error:  # InvalidParams, QueueFull, UnknownLoRA: raised again on the API side
            return Admission(command.request_id, RemoteError.of(error))
        return Admission(command.request_id)

    def _call(self, command: UtilityCall) -> UtilityResult:
        try:
            result = utility_method(self.engine, command.method)(*command.args)
        except Exception as error:  # raised again on the API side
            return UtilityResult(command.call_id, error=RemoteError.of(error))
        return UtilityResult(command.call_id, result)

    def _abort_all(self) -> None:
        """On the way out: every request ends with "abort", and the API side hears so."""
        turn = _Turn(changed=True)
        for request_id in list(self.engine.scheduler.requests):
            output = self.engine.abort(request_id)
            if output is not None:
                turn.outputs.append(output)
        self._report(turn, went_idle=True)

    # -- outputs ---------------------------------------------------------------------------------

    def _report(self, turn: _Turn, went_idle: bool) -> None:
        snapshot = self._snapshot(turn.changed, went_idle)
        if snapshot is None and not (turn.admissions or turn.outputs or turn.results):
            return
        self._send(CoreOutputs(snapshot, turn.admissions, turn.outputs, turn.results))

    def _snapshot(self, changed: bool, went_idle: bool) -> EngineSnapshot | None:
        now = time.monotonic()
        due = now - self._last_snapshot >= self.snapshot_interval_s
        if not (changed or went_idle or (due and self.engine.has_unfinished())):
            return None
        self._last_snapshot = now
        rows = None
        if went_idle or now - self._last_rows >= self.snapshot_interval_s:
            self._last_rows = now
            scheduler = self.engine.scheduler
            rows = RequestsView.of(scheduler.running, scheduler.waiting)
        return EngineSnapshot(take_stats(self.engine.stats), rows)

    def _send(self, message: CoreOutputs | CoreFailed) -> None:
        self._output.send(self.codec.encode(message), copy=False)

    def _close(self) -> None:
        self._input.close(linger=0)
        self._output.close()
        self._context.term()
