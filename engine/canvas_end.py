"""What a finished canvas adds to a request's output, and whether the request ends there (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.engine_config import EngineConfig
from engine.outputs import CommitSpec
from engine.request import FinishReason, Request, TokenLogprob


@dataclass(frozen=True)
class CanvasEnd:
    """The tokens a finished canvas adds to the output, and the finish reason if the request is done."""

    new_token_ids: list[int]
    finish_reason: FinishReason | None

    def logprobs_of(self, logprobs: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
        """The entries of the tokens this canvas adds (the canvas's logprobs cut like its tokens)."""
        return None if logprobs is None else logprobs[: len(self.new_token_ids)]


def end_canvas(canvas: list[int], num_output: int, max_tokens: int, stop_ids: tuple[int, ...]) -> CanvasEnd:
    """Cut a finished canvas at the first stop id (excluded from the output) and at `max_tokens`.

    The reference pads everything after the first stop id and ends the sequence; we end the request
    there instead. `max_tokens` keeps OpenAI's meaning, although the model always fills whole canvases.
    Example, max_tokens 10, 6 tokens out, canvas [5, 9, 1, 7] with stop id 1: adds [5, 9], "stop".
    Without a stop id within reach, the canvas is cut to the 4 remaining tokens: "length".
    """
    remaining = max_tokens - num_output
    stop_at = next((i for i, t in enumerate(canvas) if t in stop_ids), None)
    if stop_at is not None and stop_at < remaining:
        return CanvasEnd(canvas[:stop_at], "stop")
    if len(canvas) >= remaining:
        return CanvasEnd(canvas[:remaining], "length")
    return CanvasEnd(canvas, None)


def repeated_tokens(canvas: list[int], end: CanvasEnd) -> list[int]:
    """The tokens of a request's last canvas that a client's next prompt repeats (`engine.cache_tail`).

    The output, and after a stop id that stop id too: a chat template closes the model's turn with its
    end-of-turn token, which is a stop id (Gemma 4's `<turn|>`). Nothing after it: the rest of the
    canvas was never output. Example: canvas [5, 9, 1, 7] ended by stop id 1 after [5, 9]: [5, 9, 1].
    """
    num_output = len(end.new_token_ids)
    return canvas[: num_output + 1] if end.finish_reason == "stop" else canvas[:num_output]


def commit_spec(request: Request, config: EngineConfig | None = None) -> CommitSpec | None:
    """How the runner must commit the request's next canvas: None unless it asks for a grammar or logprobs.

    A grammar resumes after the output so far (for a constrained request that is every committed
    token: its canvases commit whole until the grammar or `max_tokens` ends it) and may decode only
    the output tokens left. A grammar's guided denoising follows `config` (none without one).
    """
    params = request.params
    if params.grammar is None and params.logprobs is None:
        return None
    assert params.max_tokens is not None and params.stop_token_ids is not None
    guided = params.grammar is not None
    return CommitSpec(
        logprobs=params.logprobs,
        grammar=params.grammar,
        grammar_prefix=tuple(request.output_token_ids) if params.grammar is not None else (),
        budget=params.max_tokens - len(request.output_token_ids),
        stop_token_ids=params.stop_token_ids,
        pin_skeleton=guided and config is not None and config.guided_pin_skeleton,
        renoise=guided and config is not None and config.guided_renoise,
    )
