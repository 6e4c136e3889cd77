"""Incremental detokenisation that never splits a UTF-8 character."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Each push decodes the whole output (exact: byte-fallback pieces and spacing decode as in the
    final text; one decode per committed canvas is cheap) and emits what lies beyond the text already
    emitted. Trailing U+FFFD marks a character whose bytes have not all arrived: it is held back until
    they do, or until the request finishes. Example: "snow ❄" with the snowflake's 3 bytes split over
    two canvases emits "snow " after the first and "❄" after the second.
    """

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.num_emitted_chars = 0

    def push(self, new_token_ids: list[int], is_last: bool = False) -> str:
        """Add tokens; return the text that became final (everything left, when `is_last`)."""
        self.token_ids += new_token_ids
        if self.tokenizer is None:
            return ""
        text = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        if not is_last:
            text = text.rstrip(REPLACEMENT)
        delta = text[self.num_emitted_chars :]
        self.num_emitted_chars = max(self.num_emitted_chars, len(text))
        return delta
