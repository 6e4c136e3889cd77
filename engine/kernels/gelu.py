"""The tanh-approximated GELU of Gemma's MLPs and experts, and its faster compiled form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GELU_INNER = 2 * math.sqrt(2 / math.pi)
"""tanh-GELU as a sigmoid: 0.5 x (1 + tanh(z)) = x sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3)."""


def gelu_tanh(x: Tensor) -> Tensor:
    """`F.gelu(x, approximate="tanh")`; under `torch.compile` written with a sigmoid, which inductor's CPU
    code runs about 2.5x faster than its tanh (bench/RESULTS.md, "The compiled step, continued"). The same
    function up to fp32 rounding, computed in fp32 and rounded to x's dtype as `F.gelu` does."""
    if torch.compiler.is_compiling():
        return gelu_tanh_by_sigmoid(x)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_by_sigmoid(x: Tensor) -> Tensor:
    """x sigmoid(2 z) in fp32, rounded to x's dtype (see `GELU_INNER`)."""
    xf = x.float()
    return (xf * torch.sigmoid(GELU_INNER * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)
