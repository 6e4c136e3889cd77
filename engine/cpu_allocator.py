"""The engine core process's memory allocator on the CPU (`--cpu-allocator`).

torch has no caching allocator on the CPU: every tensor is a fresh `malloc`. glibc serves allocations
of 32 MiB and more (one canvas's fp32 logits at a 32k vocabulary; a [256, 262144] bf16 logits tile of
the real model is 128 MiB) with a new `mmap` and returns them with `munmap` when freed, so every step
faults its large tensors' pages in again, the kernel zeroing each 4 KiB page on first touch. On the
2-core VM, casting one [256, 32768] bf16 tile into a new fp32 tensor took 23 ms, into an existing one
2 ms. tcmalloc keeps freed memory mapped and hands it out again: `bench/forward.py`'s bf16 forward runs
1.24x faster under it (bench/RESULTS.md; vLLM's CPU backend preloads tcmalloc for the same reason).
jemalloc with its default settings was no faster at 4 canvases and slower at 16, so it is not offered.

A library can only replace malloc from a process's start, through `LD_PRELOAD`. The engine core is a
spawned process, so `preloaded` sets `LD_PRELOAD` around its start: the core gets the allocator, the
API process keeps glibc's. `auto` takes tcmalloc where the dynamic loader finds it (`apt-get install
libtcmalloc-minimal4`; the Docker image has it) and glibc's malloc where not; `tcmalloc` requires it.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

CpuAllocator = Literal["auto", "system", "tcmalloc"]
"""`--cpu-allocator`: `auto`, `system`, or a named allocator of `LIBRARIES`."""
CHOICES: tuple[str, ...] = get_args(CpuAllocator)

LIBRARIES: dict[str, tuple[str, ...]] = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
"""Each allocator's library names, as `ctypes.util.find_library` takes them (no `lib`, no `.so`)."""
assert set(CHOICES) == {"auto", "system", *LIBRARIES}, "every named choice has its libraries"

PACKAGES = {"tcmalloc": "libtcmalloc-minimal4"}
"""The Debian/Ubuntu package of each allocator."""


QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
"""Set for the preloaded process unless already set: tcmalloc would print a line to stderr for every
allocation over 1 GiB (a KV cache, a model's weights)."""


class AllocatorNotFound(RuntimeError):
    """A named allocator whose library the dynamic loader does not find."""


def find_library(allocator: str) -> str | None:
    """The shared library of `allocator` (a `LIBRARIES` key) the loader would map, or None."""
    for name in LIBRARIES[allocator]:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def resolve(choice: str) -> str | None:
    """`--cpu-allocator` -> the library to preload, or None for glibc's malloc.

    `auto`: tcmalloc, else None. `system`: None. A named allocator: its library, or `AllocatorNotFound`
    saying how to install it.
    """
    if choice not in CHOICES:
        raise ValueError(f"--cpu-allocator {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "system":
        return None
    if choice == "auto":
        return next(filter(None, (find_library(name) for name in LIBRARIES)), None)
    library = find_library(choice)
    if library is None:
        raise AllocatorNotFound(
            f"--cpu-allocator {choice}: its library is not installed (Debian/Ubuntu: apt-get install "
            f"{PACKAGES[choice]}); or use --cpu-allocator auto or system"
        )
    return library


@contextmanager
def preloaded(library: str | None) -> Iterator[None]:
    """`LD_PRELOAD` names `library` (before what it already names) inside the block, for the processes
    started there; restored after. None changes nothing."""
    if library is None:
        yield
        return
    before = {name: os.environ.get(name) for name in ("LD_PRELOAD", *QUIET)}
    os.environ["LD_PRELOAD"] = ":".join(filter(None, (library, before["LD_PRELOAD"])))
    for name, quiet in QUIET.items():
        os.environ.setdefault(name, quiet)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
