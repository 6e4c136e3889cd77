"""Which attention backend runs on a device: decided once (by the runner, or the model for a bare batch).

The Triton backend where `engine.kernels.dispatch.use_kernels(device)` says so (CUDA with Triton, or
forced by tests and benchmarks), the torch reference otherwise. Triton is imported only when chosen.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention.base import AttentionBackend
from engine.attention.reference import TorchAttention
from engine.kernels.dispatch import use_kernels


def select_attention_backend(device: torch.device) -> AttentionBackend[Any]:
    """The backend for work on `device` (read `dispatch.force` at the time of the call)."""
    if use_kernels(device):
        from engine.attention.triton_backend import TritonAttention  # imports triton: only when chosen

        return TritonAttention()
    return TorchAttention()
