"""Session-wide test settings.

Without CUDA, Triton kernels run in Triton's interpreter. `TRITON_INTERPRET` is read when triton is
first imported, and transformers or torch may import triton while other test modules are collected,
so it is set here, before any collection.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
