"""When the Triton kernels replace the torch reference.

Auto (the default): on CUDA tensors when Triton imports. `force` overrides it both ways: tests set it
to True to run the kernels on CPU tensors under `TRITON_INTERPRET=1`; benchmarks set it to False to
time the torch reference on the GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_force: bool | None = None


def triton_available() -> bool:
    """Triton is installed (it imports lazily: CPU-only deployments need not have it)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(device: torch.device) -> bool:
    """True when work on `device` should go to the Triton kernels."""
    if _force is not None:
        return _force
    return device.type == "cuda" and triton_available()


@contextmanager
def force(enabled: bool | None) -> Iterator[None]:
    """Within the block, `use_kernels` returns `enabled` for every device (None restores auto)."""
    global _force
    previous, _force = _force, enabled
    try:
        yield
    finally:
        _force = previous
