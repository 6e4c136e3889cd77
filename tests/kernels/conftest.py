"""Kernel tests run on CUDA when present, else in Triton's interpreter on the CPU (small shapes).

`TRITON_INTERPRET` must be set before triton is first imported: tests/conftest.py sets it for the
whole session; setting it here too keeps `pytest tests/kernels` alone correct.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: CUDA if present, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
