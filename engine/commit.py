"""Committing a finished canvas for a request that asks for more than its argmax: a grammar, logprobs.

The runner keeps one `CanvasCommit` per such request's current canvas. When the canvas finishes it
recomputes that canvas's logits once from the final step's hidden states (one [C, V] fp32 tile,
freed before the next request's), decodes under the grammar if there is one, and reads the logprobs
of the committed tokens off the same tile. Requests without a `CommitSpec` never get here.
While the canvas denoises, the same matcher guides it when the spec asks (`pins` at its start,
`guide` after each step; `engine.guided_denoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from engine.guided import decode_under_grammar
from engine.guided_denoise import renoise_refused, skeleton_pins
from engine.logprobs import token_logprobs
from engine.outputs import CommitSpec
from engine.request import TokenLogprob
from engine.sampler import CanvasState, LMHead, logits_for


@dataclass
class CanvasCommit:
    """One canvas's commit policy: its spec, and for a grammar the matcher resumed after the output."""

    spec: CommitSpec
    matcher: Any | None = None
    """An xgrammar `GrammarMatcher` (None without a grammar)."""

    def pins(self, pinned_canvas: tuple[int, ...] | None, canvas_length: int) -> tuple[int, ...] | None:
        """The canvas's pins: `pinned_canvas`, plus the grammar's forced skeleton if the spec asks."""
        if self.matcher is None or not self.spec.pin_skeleton:
            return pinned_canvas
        return skeleton_pins(self.matcher, pinned_canvas, canvas_length, self._budget(canvas_length))

    def guide(self, state: CanvasState, vocab_size: int) -> None:
        """After a step that did not finish the canvas: re-noise a refused token if the spec asks."""
        if self.matcher is not None and self.spec.renoise:
            renoise_refused(state, self.matcher, self._budget(len(state.tokens)), vocab_size)

    def _budget(self, canvas_length: int) -> int:
        return canvas_length if self.spec.budget is None else self.spec.budget

    def commit(
        self, hidden_tile: Tensor, head: LMHead, argmax: Tensor
    ) -> tuple[list[int], list[TokenLogprob] | None]:
        """The committed canvas and, if asked, the logprobs of its decoded positions.

        hidden_tile [C, H] is the final step's decoder output for this canvas; argmax [C] what the
        sampler would commit. With a grammar the canvas is decoded under it: after the grammar's stop
        token the rest of the canvas repeats that token; past the budget it keeps the argmax (both are
        cut by `end_canvas`). Logprobs cover the decoded positions (without a grammar: all C, or the
        output tokens left if fewer).
        """
        logits = logits_for(hidden_tile, head)  # [C, V] fp32, temperature 1
        canvas = [int(t) for t in argmax.tolist()]
        decoded = canvas
        if self.matcher is not None:
            budget = len(canvas) if self.spec.budget is None else self.spec.budget
            want_mask = self.spec.logprobs is not None
            decoded, ended = decode_under_grammar(logits, canvas, self.matcher, budget, want_mask)
            canvas = _fill(decoded, canvas, ended)
        if self.spec.logprobs is None:
            return canvas, None
        if self.matcher is None and self.spec.budget is not None:
            decoded = decoded[: self.spec.budget]  # positions past max_tokens are never output
        chosen = argmax.new_tensor(decoded)  # [n]
        return canvas, token_logprobs(logits[: len(decoded)], chosen, self.spec.logprobs)


def _fill(decoded: list[int], argmax: list[int], ended: bool) -> list[int]:
    """A full canvas from the decoded prefix: the stop token repeated after the grammar ended, else argmax."""
    rest = [decoded[-1]] * (len(argmax) - len(decoded)) if ended else argmax[len(decoded) :]
    return decoded + rest
