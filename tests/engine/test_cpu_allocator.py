"""`--cpu-allocator` (`engine.cpu_allocator`): which malloc library the engine core processes start
with, and that a started core really maps it (its /proc/<pid>/maps)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from engine import cpu_allocator
from engine.core_client import EngineCoreClient
from engine.cpu_allocator import AllocatorNotFound, find_library, preloaded, resolve
from engine.model.loader import load_tokenizer
from tests.engine.checkpoints import save_servable
from tests.engine.core_build import build_engine_at


def _installed(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Pretend only the libraries of `names` are installed."""
    found = {library: f"lib{library}.so.9" for name in names for library in cpu_allocator.LIBRARIES[name]}
    monkeypatch.setattr(cpu_allocator.ctypes.util, "find_library", found.get)


def test_auto_takes_tcmalloc_where_installed_else_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "tcmalloc")
    assert resolve("auto") == "libtcmalloc_minimal.so.9"
    assert resolve("system") is None
    _installed(monkeypatch)
    assert resolve("auto") is None


def test_a_named_allocator_that_is_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "tcmalloc")
    assert resolve("tcmalloc") == "libtcmalloc_minimal.so.9"
    _installed(monkeypatch)
    with pytest.raises(AllocatorNotFound, match="apt-get install libtcmalloc-minimal4"):
        resolve("tcmalloc")
    with pytest.raises(ValueError, match="auto, system, tcmalloc"):
        resolve("jemalloc")


def test_preloading_is_confined_to_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", raising=False)
    with preloaded("libtcmalloc_minimal.so.4"):
        assert os.environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
        assert int(os.environ["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40, "no stderr per KV cache"
    assert "LD_PRELOAD" not in os.environ and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in os.environ
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    with preloaded("libtcmalloc_minimal.so.4"):
        assert os.environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libother.so"
    assert os.environ["LD_PRELOAD"] == "libother.so"
    with preloaded(None):
        assert os.environ["LD_PRELOAD"] == "libother.so"


INSTALLED = find_library("tcmalloc")


@pytest.mark.skipif(
    INSTALLED is None, reason="tcmalloc is not installed here (apt-get install libtcmalloc-minimal4)"
)
def test_an_engine_core_starts_with_the_allocator_and_the_api_process_keeps_its_own(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert INSTALLED is not None
    path: Path = save_servable(tmp_path_factory.mktemp("tiny"), seed=1)
    build = functools.partial(build_engine_at, str(path))
    core = EngineCoreClient(build, load_tokenizer(path), num_threads=1, preload=INSTALLED)
    try:
        maps = Path(f"/proc/{core.process.pid}/maps").read_text()
        assert INSTALLED in maps, f"the core process maps {INSTALLED}"
    finally:
        core.shutdown()
    assert INSTALLED not in Path("/proc/self/maps").read_text()
    assert INSTALLED not in os.environ.get("LD_PRELOAD", "")
