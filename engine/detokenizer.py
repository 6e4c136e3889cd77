"""Incremental detokenisation that never splits a UTF-8 character."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Each push decodes a short window: the tokens already emitted since `prefix_offset` (as context,
    so spacing and byte-fallback pieces decode as they will in the full text) plus the new ones, and
    emits what the new tokens add. A trailing U+FFFD means a character whose bytes have not all
    arrived, so nothing is emitted until they do (or the request finishes). Example: a 3-byte
    character split over two canvases is held back after the first and emitted whole after the second.
    """

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_token_ids: list[int], is_last: bool = False) -> str:
        """Add tokens; return the text that became final (everything left, when `is_last`)."""
        self.token_ids += new_token_ids
        if self.tokenizer is None or self.read_offset == len(self.token_ids):
            return ""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT) and not is_last):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return text[len(prefix) :]

    def _decode(self, start: int, end: int) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True))
