"""The MoE experts as two grouped matmuls over expert-sorted tokens, with no host synchronisation.

The reference path (`engine.model.methods.plain.looped_experts`) loops over experts in Python and needs
the token count of each on the host (one device-to-host sync per layer, plus one small matmul per
expert). Here each (token, expert) pair becomes one row, rows are sorted by expert, and
`torch.nn.functional.grouped_mm` multiplies every expert's slice of rows by its own weights in one call:
on CUDA (bf16, SM >= 80) that is a single grouped GEMM launch; on the CPU it is torch's fallback (a C++
loop of matmuls), which bf16 inference on the CPU selects and the tests use.

Example, 3 tokens, k = 2, 4 experts, expert_ids [[2, 0], [0, 1], [2, 3]]:
flat experts [2, 0, 0, 1, 2, 3] -> sorted rows for tokens [0, 1, 1, 0, 2, 2] with experts
[0, 0, 1, 2, 2, 3]; `offs` (the end of each expert's slice) = [2, 3, 5, 6].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kernels.gelu import gelu_tanh

_ALIGN_BYTES = 16
"""grouped_mm needs every row stride (in bytes) to be a multiple of 16."""


def grouped_mm_fits(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> bool:
    """True when the shapes and dtype meet `grouped_mm`'s layout rules on x's device.

    CUDA's grouped GEMM takes bf16 on SM >= 80; torch's CPU fallback takes fp32 and bf16 but has no
    weight gradient, so it serves inference only.
    """
    if not _backend_takes(x, needs_grad=torch.is_grad_enabled() and down_proj.requires_grad):
        return False
    widths = (x.shape[-1], gate_up_proj.shape[1], down_proj.shape[2])
    return all(width * x.element_size() % _ALIGN_BYTES == 0 for width in widths)


def _backend_takes(x: Tensor, needs_grad: bool) -> bool:
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.dtype in (torch.float32, torch.bfloat16) and not needs_grad


def grouped_experts(
    x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """Sum over each token's k experts of `weight * expert(x)`, as `looped_experts` computes it.

    x (T, H); weights (T, k) fp32; expert_ids (T, k); gate_up_proj (E, 2I, H) with gate rows first;
    down_proj (E, H, I). Returns (T, H) in x's dtype.
    """
    num_experts = gate_up_proj.shape[0]
    flat_experts = expert_ids.flatten()  # (T*k,)
    order = torch.argsort(flat_experts, stable=True)  # (T*k,)
    token_ids = order // expert_ids.shape[1]  # (T*k,) the token of each sorted row
    boundaries = torch.arange(num_experts, device=x.device, dtype=flat_experts.dtype)
    offs = torch.searchsorted(flat_experts[order], boundaries, right=True).to(torch.int32)  # (E,)
    rows = x[token_ids]  # (T*k, H)
    gate, up = F.grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # (T*k, I) x2
    hidden = gelu_tanh(gate) * up
    out_rows = F.grouped_mm(hidden, down_proj.transpose(1, 2), offs=offs)  # (T*k, H)
    if torch.compiler.is_compiling():
        return _gathered_sum(out_rows, weights, order)
    out_rows = (out_rows * weights.flatten()[order, None]).to(x.dtype)  # weighted in fp32, as the loop does
    return torch.zeros_like(x).index_add_(0, token_ids, out_rows)


def _gathered_sum(out_rows: Tensor, weights: Tensor, order: Tensor) -> Tensor:
    """Each token's k rows gathered back from expert order, weighted and summed in fp32, rounded once:
    (T*k, H) sorted rows, (T, k) weights -> (T, H). What compiled layers run instead of the weighting
    and `index_add_`: inductor fuses the gather, the weights and the sum into one loop with no scatter
    (the bench model's 16-canvas forward: 403 -> 391 ms). The loop rounds each weighted row and each partial
    sum to bf16; this rounds once, so it is as close to fp32 or closer.

    Example, k = 2, order [1, 2, 0, 3] (sorted row j holds flat row order[j]): inverse [2, 0, 1, 3],
    so token 0 sums sorted rows 2 and 0, token 1 rows 1 and 3.
    """
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    rows = out_rows[inverse].view(*weights.shape, out_rows.shape[-1])  # (T, k, H)
    return (rows * weights[..., None]).sum(dim=1).to(out_rows.dtype)  # (T, H)
