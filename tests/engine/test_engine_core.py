"""The engine core in its own process, driven through `EngineCoreClient` (no HTTP): the same outputs
as in-process generation, aborts that free the request, admission errors and utility calls across
the boundary, and a core that dies (killed, failing to start, or orphaned) never leaves a caller
hanging or a process behind."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine.client import EngineDead, UtilityError
from engine.core_client import EngineCoreClient, EngineStartError
from engine.llm import LLM
from engine.model.loader import load_tokenizer
from engine.request import InvalidParams, RequestOutput, SamplingParams
from tests.engine.checkpoints import CANVAS, save_servable
from tests.engine.core_build import build_engine_at, fail_to_build
from tests.server_process import REPO

T = TypeVar("T")


class Core:
    """A started client on its own event loop; `run(coro)` runs a coroutine on that loop."""

    def __init__(self, path: Path, **config: int) -> None:
        self.loop = asyncio.new_event_loop()
        build = functools.partial(build_engine_at, str(path), **config)
        self.client = EngineCoreClient(build, load_tokenizer(path), num_threads=1)
        self.run(self._start())

    async def _start(self) -> None:
        self.client.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def wait_for(self, condition: Any, timeout_s: float = 30.0) -> None:
        """Let the loop run until `condition()` holds."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.run(asyncio.sleep(0.05))

    def close(self) -> None:
        self.client.shutdown()
        self.run(asyncio.sleep(0.01))  # let the reader's cancellation finish
        self.loop.close()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_servable(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def core(checkpoint_dir: Path) -> Iterator[Core]:
    running = Core(checkpoint_dir, max_num_seqs=4)
    yield running
    running.close()


def params(seed: int, steps: int = 4, max_tokens: int = 2 * CANVAS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, max_denoising_steps=steps, seed=seed, stop_token_ids=())


PROMPTS = [[2, *range(40, 40 + 3 + i)] for i in range(3)]


async def collect(core: Core, prompt: list[int], sampling: SamplingParams) -> list[RequestOutput]:
    return [output async for output in core.client.generate(prompt, sampling)]


def test_outputs_and_text_equal_in_process_generation(core: Core, checkpoint_dir: Path) -> None:
    """Token ids, detokenised text (here on the API side), usage: as `LLM.generate` gives them."""
    offline = LLM.from_checkpoint(checkpoint_dir).generate(PROMPTS, [params(i) for i in range(3)])

    async def all_of_them() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(core, p, params(i)) for i, p in enumerate(PROMPTS)))

    for outputs, expected in zip(core.run(all_of_them()), offline, strict=True):
        assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
        assert "".join(o.new_text for o in outputs) == expected.text
        assert outputs[-1].finish_reason == expected.finish_reason == "length"
        assert outputs[-1].usage == expected.usage
    assert core.client.stats.finished_by_reason.get("length", 0) >= 3
    assert core.client.stats.num_output_tokens >= sum(len(r.token_ids) for r in offline)


def test_an_abort_frees_the_request(core: Core) -> None:
    """Closing a stream mid-request aborts it in the core: the shipped stats and summaries show it gone."""
    aborted_before = core.client.stats.finished_by_reason.get("abort", 0)

    async def start_then_close() -> RequestOutput:
        long = params(1, steps=1000, max_tokens=4 * CANVAS)
        stream = await core.client.submit(PROMPTS[0], long, "long", want_canvas=True)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    first = core.run(start_then_close())
    assert first.canvas is not None and not first.finished
    stats = core.client.stats
    core.wait_for(lambda: stats.finished_by_reason.get("abort", 0) == aborted_before + 1)
    core.wait_for(lambda: not core.client.requests().running and stats.num_running == 0)
    assert stats.kv_usage == 0.0
    assert core.client.num_in_flight == 0


def test_admission_errors_are_raised_as_themselves(core: Core) -> None:
    with pytest.raises(InvalidParams, match="outside the vocabulary") as error:
        core.run(collect(core, [2, 10**6], params(0)))
    assert error.value.param == "prompt"
    with pytest.raises(InvalidParams, match="maximum context length"):
        core.run(collect(core, [2, 5], params(0, max_tokens=10**5)))
    assert core.client.num_in_flight == 0 and core.client.is_alive


def test_utility_calls_run_public_engine_methods_only(core: Core) -> None:
    assert core.run(core.client.call_utility("has_unfinished")) is False
    assert core.run(core.client.call_utility("abort", "no-such-request")) is None
    with pytest.raises(UtilityError, match="private"):
        core.run(core.client.call_utility("_finalise", []))
    with pytest.raises(UtilityError, match="no method 'reset_everything'"):
        core.run(core.client.call_utility("reset_everything"))


def test_a_killed_core_fails_open_streams_and_new_requests(checkpoint_dir: Path) -> None:
    core = Core(checkpoint_dir)
    try:

        async def killed_mid_stream() -> list[RequestOutput]:
            outputs = []
            async for output in core.client.generate(PROMPTS[0], params(0, steps=1000), "r", True):
                outputs.append(output)
                if len(outputs) == 2:
                    os.kill(core.client.process.pid, signal.SIGKILL)
            return outputs

        start = time.monotonic()
        with pytest.raises(EngineDead, match="killed by SIGKILL"):
            core.run(asyncio.wait_for(killed_mid_stream(), 60))
        assert time.monotonic() - start < 30
        assert not core.client.is_alive
        with pytest.raises(EngineDead):
            core.run(collect(core, PROMPTS[0], params(0)))
        with pytest.raises(EngineDead):
            core.run(core.client.call_utility("has_unfinished"))
    finally:
        core.close()


def test_a_core_that_cannot_build_its_engine_is_a_start_error(checkpoint_dir: Path) -> None:
    build = functools.partial(fail_to_build, "model.safetensors is missing from /nowhere")
    with pytest.raises(EngineStartError, match=r"model\.safetensors is missing from /nowhere"):
        EngineCoreClient(build, None, num_threads=1)


ORPHAN_SCRIPT = """
import functools, sys, time
from engine.core_client import EngineCoreClient
from tests.engine.core_build import build_engine_at
if __name__ == "__main__":
    client = EngineCoreClient(functools.partial(build_engine_at, sys.argv[1]), None, num_threads=1)
    print(client.process.pid, flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
def test_a_core_whose_server_was_killed_exits_by_itself(checkpoint_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        assert not _gone(engine_pid)
    finally:
        parent.kill()
        parent.wait(30)
    deadline = time.monotonic() + 20
    while not _gone(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(engine_pid), "the engine core outlived its server"
