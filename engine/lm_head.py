"""The tied LM head: raw logits `hidden @ W.T`, their soft-cap in fp32, and the soft embedding's weight.

`LMHead` carries the embedding weight, the soft-cap and `embed_scale`, plus the CPU's faster forms of
the same arithmetic where they were measured faster and give the same bits: oneDNN's prepacked copy of
the weight (`prepacked`) and, in compiled engines, the soft-cap of bf16 logits as a table lookup
(`with_table`). `logits_for` is a whole canvas's softcapped fp32 logits; the sampler's row tiles take
`tempered_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kernels.packed_linear import faster_packed, packed_linear
from engine.kernels.softcap_table import build_table, table_softcap


@dataclass(frozen=True)
class LMHead:
    """The tied LM head: logits = softcap((hidden @ weight.T).float()); `weight` is also the embedding table.

    `embed_scale` is 0-d in `weight.dtype` (the reference's `embed_scale.to(weight.dtype)`, i.e. sqrt(H)
    rounded to fp32, then to the weight dtype); it scales the soft embeddings.
    """

    weight: Tensor
    """[V, H], model dtype."""
    softcap: float | None
    """`final_logit_softcapping`; None disables it."""
    embed_scale: Tensor
    packed: Tensor | None = None
    """oneDNN's prepacked copy of `weight` for `project` (`prepacked()`: bf16 on the CPU), or None."""
    table: Tensor | None = None
    """[65536] fp32: the soft-cap of every bf16 value (`with_table()`: bf16 on the CPU, compiled
    engines), which `softcap` looks raw logits up in; None computes it."""

    def __post_init__(self) -> None:
        assert self.weight.dim() == 2 and self.embed_scale.dim() == 0, "weight is [V, H]; embed_scale is 0-d"

    @classmethod
    def tied(cls, weight: Tensor, softcap: float | None) -> LMHead:
        """The head the reference builds: embed_scale = torch.tensor(sqrt(H)) cast to the weight dtype."""
        scale = torch.tensor(weight.shape[1] ** 0.5).to(device=weight.device, dtype=weight.dtype)
        return cls(weight=weight, softcap=softcap, embed_scale=scale)

    def prepacked(self) -> LMHead:
        """This head with `weight` prepacked for `project` where that is bit-identical and measured faster
        (bf16 on a oneDNN CPU: `engine.kernels.packed_linear.faster_packed`, a second copy of the weight);
        itself elsewhere."""
        if self.packed is not None:
            return self
        packed = faster_packed(self.weight)
        return self if packed is None else replace(self, packed=packed)

    def with_table(self) -> LMHead:
        """This head with its soft-cap as a table lookup where the raw logits are bf16 on the CPU
        (`engine.kernels.softcap_table`: bit-identical, one compiled pass); itself elsewhere."""
        if self.table is not None or self.softcap is None or not _takes_table(self.weight):
            return self
        return replace(self, table=build_table(self.softcap))

    def project(self, hidden: Tensor) -> Tensor:
        """Raw logits `hidden @ weight.T` in the weight dtype: [R, H] -> [R, V]."""
        if self.packed is None:
            return F.linear(hidden, self.weight)
        return packed_linear(hidden, self.packed)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


def logits_for(hidden_tile: Tensor, head: LMHead) -> Tensor:
    """Softcapped fp32 logits of one tile, in the reference's order of ops: [C, H] -> [C, V] fp32."""
    return softcap(head.project(hidden_tile), head)  # [C, V]


def softcap(raw_logits: Tensor, head: LMHead) -> Tensor:
    """The head's soft-cap of raw logits in fp32 (in place when they are fp32): [R, V] -> [R, V] fp32.
    A head with a table looks bf16 logits up in it (whole canvases: `logits_for`)."""
    if head.table is not None and _takes_table(raw_logits):
        return table_softcap(raw_logits, head.table)
    return _softcap_ops(raw_logits, head.softcap)


def tempered_logits(raw_logits: Tensor, head: LMHead, temperature: Tensor) -> Tensor:
    """`softcap(raw_logits, head) / temperature` (broadcast) by the reference's ops, never the table:
    the sampler calls it on row tiles, dozens a canvas, where the compiled lookup's cost per call
    outweighed the passes it saves (bench/RESULTS.md, "Compiled bf16 on the CPU")."""
    return _softcap_ops(raw_logits, head.softcap).div_(temperature)


def _softcap_ops(raw_logits: Tensor, cap: float | None) -> Tensor:
    logits = raw_logits.to(torch.float32)  # [R, V]
    if cap is not None:
        logits = logits.div_(cap).tanh_().mul_(cap)
    return logits


def _takes_table(tensor: Tensor) -> bool:
    """The soft-cap table reads bf16 raw logits on the CPU (the compiled lookup is inductor's C++)."""
    return tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
