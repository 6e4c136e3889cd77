"""`CoreProcess`: the engine core's process as its parent sees it: spawned, ready or not, stopped.

The process is started with the 'spawn' method (a fresh interpreter: no copy of the parent's threads,
locks or CUDA state) and reports on a one-way pipe, once, whether it could build its engine:
`EngineReady` with the engine's resolved limits, or `CoreFailed` with the reason. Request traffic
never goes through the pipe; `engine.core_client` binds the ZeroMQ sockets for that.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection

from engine.core import CoreLaunch, run_engine_core
from engine.cpu_allocator import preloaded
from engine.messages import CoreFailed, EngineReady

logger = logging.getLogger(__name__)

READY_POLL_S = 0.5
"""How often start-up checks that the process is still alive while it waits for the report."""


class EngineStartError(RuntimeError):
    """The engine core process could not build its engine; the message says why."""


class CoreProcess:
    """A spawned engine core. The constructor returns once the engine is built, with its `ready`
    report, or raises `EngineStartError` (the process is then gone)."""

    def __init__(self, launch: CoreLaunch, preload: str | None = None) -> None:
        """`preload`: a malloc library the process starts with (`engine.cpu_allocator`), or None."""
        spawn = multiprocessing.get_context("spawn")
        receiver, sender = spawn.Pipe(duplex=False)
        self._process = spawn.Process(
            target=run_engine_core, args=(launch, sender), name="canvas-engine-core", daemon=True
        )
        with preloaded(preload):
            self._process.start()
        sender.close()
        try:
            self.ready = self._await_ready(receiver)
        except BaseException:
            self.stop(timeout=5.0)
            raise
        finally:
            receiver.close()

    def _await_ready(self, receiver: Connection) -> EngineReady:
        while True:
            if receiver.poll(READY_POLL_S):
                try:
                    report = receiver.recv()
                except EOFError:
                    break
                if isinstance(report, CoreFailed):
                    raise EngineStartError(report.message)
                assert isinstance(report, EngineReady)
                return report
            if not self._process.is_alive():
                break
        self._process.join(5.0)
        raise EngineStartError(f"the engine process {self.exit_text()} before it was ready")

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends (for the event loop)."""
        return self._process.sentinel

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def reap(self, timeout: float = 1.0) -> None:
        """Collect the exit status of a process that has ended."""
        self._process.join(timeout)

    def exit_text(self) -> str:
        """How the process ended, in words: "exited with code 1", "was killed by SIGKILL"."""
        code = self._process.exitcode
        if code is None:
            return "is still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def stop(self, timeout: float) -> None:
        """SIGTERM (the core aborts what runs and exits), then SIGKILL if it is still there."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process ignored SIGTERM for %.0fs: killing it", timeout)
            self._process.kill()
            self._process.join(5.0)
