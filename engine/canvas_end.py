"""What a finished canvas adds to a request's output, and whether the request ends there (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import FinishReason


@dataclass(frozen=True)
class CanvasEnd:
    """The tokens a finished canvas adds to the output, and the finish reason if the request is done."""

    new_token_ids: list[int]
    finish_reason: FinishReason | None


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
