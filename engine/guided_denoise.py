"""Guided denoising for grammar-constrained canvases: a pinned skeleton, and re-noising refused tokens.

Both act during denoising only; validity itself is the commit's job (`engine.guided`). They are
per-request options the engine sets on a constrained request's `CommitSpec` (`EngineConfig.
guided_pin_skeleton`, `guided_renoise`); bench/RESULTS.md ("Guided denoising") has what each does.

- Skeleton: when a canvas starts, the text the grammar forces from the request's grammar state (for a
  JSON schema with fixed keys, `{"name": "` ...; xgrammar's jump-forward tokens) is pinned at the
  canvas's first positions: never re-noised, no share of the entropy budget, its argmax is the pinned
  token. Only the forced prefix has known positions: what the grammar forces after a free-length value
  has none until that value is written.
- Re-noise: after every denoise step that does not finish the canvas, the run of accepted positions
  at the canvas's start is walked under the grammar (from the request's committed grammar state); the
  first accepted token the grammar refuses there goes back to uniform noise. That token cannot be part
  of any valid continuation of the tokens before it, so it is exactly wrong; the accepted tokens after
  it are left alone, since whether they fit depends on what replaces it. Cost: one `accept_token` per
  walked position and one rollback, on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.request import FREE
from engine.sampler import CanvasState


def skeleton_pins(
    matcher: Any, pinned_canvas: tuple[int, ...] | None, canvas_length: int, budget: int
) -> tuple[int, ...] | None:
    """The canvas's pins with the grammar's forced prefix added: one entry per position (token or `FREE`).

    The forced tokens come from `matcher` (not advanced) and fill positions 0.. up to the first
    position the request pinned itself, `budget` (output tokens left) and the canvas's end. Returns
    `pinned_canvas` unchanged when the grammar forces nothing there.
    Example: forced `{"a": ` as 5 tokens, nothing pinned -> (t0, .., t4, FREE, .., FREE).
    """
    pins = list(pinned_canvas) if pinned_canvas is not None else [FREE] * canvas_length
    if matcher.is_terminated():
        return pinned_canvas
    forced: list[int] = matcher.find_jump_forward_tokens()
    room = next((i for i, t in enumerate(pins) if t != FREE), canvas_length)
    forced = forced[: min(room, budget)]
    if not forced:
        return pinned_canvas
    pins[: len(forced)] = forced
    return tuple(pins)


def first_refused(matcher: Any, tokens: list[int], accepted: list[bool], budget: int) -> int | None:
    """The first position of the canvas's leading run of accepted tokens that the grammar refuses.

    Walks `tokens` [C] from position 0 while `accepted` holds and `budget` lasts, advancing `matcher`
    and rolling it back before returning (its state is unchanged). A stop token the grammar accepts
    ends the walk (the output ends there). None when every walked token is allowed.
    Example: grammar `[0-9]+`, tokens "12a4", all accepted -> 2.
    """
    walked = 0
    refused = None
    for position in range(min(len(tokens), budget)):
        if not accepted[position] or matcher.is_terminated():
            break
        if not matcher.accept_token(tokens[position]):
            refused = position
            break
        walked += 1
    if walked:
        matcher.rollback(walked)
    return refused


def renoise_refused(state: CanvasState, matcher: Any, budget: int, vocab_size: int) -> int | None:
    """Re-noise the first refused accepted token of `state` (see `first_refused`) in place; its position.

    The accepted mask is the last step's (`CanvasState.accepted`); pinned positions count as accepted
    and are never re-noised (a refused pin is left for the commit to override). The noise is a
    uniform token from the canvas's generator, drawn only when a token is refused.
    """
    if state.accepted is None:
        return None
    accepted = state.accepted if state.pinned is None else state.accepted | state.pinned  # [C] bool
    tokens, walkable = torch.stack([state.tokens, accepted.long()]).tolist()  # one copy to the host
    position = first_refused(matcher, tokens, [bool(a) for a in walkable], budget)
    if position is None or (state.pinned is not None and bool(state.pinned[position])):
        return None
    noise = torch.randint(0, vocab_size, (1,), generator=state.generator, device=state.tokens.device)  # [1]
    state.tokens[position] = noise[0]
    state.accepted[position] = False
    return position
