"""Log-probabilities of committed tokens and their top alternatives, for requests that ask.

The distribution a committed token is reported under is the one it was committed from: the canvas's
final denoise step, softmax at temperature 1 of the soft-capped fp32 logits at the token's position
(`engine.sampler.logits_for` of the final step's hidden states). The argmax commit picks the most
likely token of exactly this distribution (dividing by the step's temperature keeps the order). For a
grammar-constrained request the disallowed tokens are masked out first (-inf) and the distribution is
renormalised over the tokens the grammar allowed there, so the committed token is again its argmax.
A pinned position reports the pinned token under the model's distribution there.

Memory: the caller hands over one canvas's [C, V] logits tile and it is overwritten in place; only
[C] and [C, k] tensors are made, and the results leave as plain Python numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.request import TokenLogprob


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its k most likely tokens: [N, V], [N] -> N entries.

    `logits` is fp32, temperature 1, with -inf at masked tokens; it is turned into log-probabilities in
    place. Alternatives are sorted by log-probability (descending); masked tokens (-inf) are never
    listed, so a row lists fewer than k when fewer are allowed. Example: logits [[0, ln 3]], chosen
    [1], k 2 -> logprob ln 0.75, top ((1, ln 0.75), (0, ln 0.25)).
    """
    assert logits.dim() == 2 and chosen.shape == logits.shape[:1], "logits [N, V], chosen [N]"
    logits.sub_(logits.logsumexp(dim=-1, keepdim=True))  # [N, V] log-probabilities
    picked = logits.gather(1, chosen[:, None]).squeeze(1)  # [N]
    top_values, top_ids = logits.topk(k, dim=-1) if k > 0 else _empty(logits)  # [N, k] each
    return [
        TokenLogprob(token, lp, tuple((i, v) for i, v in zip(ids, values, strict=True) if v > -float("inf")))
        for token, lp, ids, values in zip(
            chosen.tolist(), picked.tolist(), top_ids.tolist(), top_values.tolist(), strict=True
        )
    ]


def _empty(logits: Tensor) -> tuple[Tensor, Tensor]:
    rows = logits.shape[0]
    return logits.new_empty((rows, 0)), torch.empty((rows, 0), dtype=torch.long, device=logits.device)
