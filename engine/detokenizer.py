"""Incremental detokenisation: each push decodes only the new tokens and a few before them, and never
splits a UTF-8 character."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
LOOKBACK = 6
"""Tokens decoded again before the new ones: context for the decoder's spacing and merges."""
MAX_CHAR_TOKENS = 4
"""Byte-fallback tokens of one character at most (UTF-8 has up to 4 bytes)."""


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, decoding a window, not the whole output.

    The window is tokens[prefix_offset:]. Text up to `read_offset` has been emitted, and so have
    `num_pending_chars` characters beyond it. A push decodes tokens[prefix_offset:read_offset] (the
    base) and the whole window, and emits what the window adds beyond the base and the pending
    characters; the window starts a few tokens (`LOOKBACK`) before `read_offset`, so spacing and merges
    decode as in the full text (vLLM's prefix/read offsets, with whole canvases as the increments).

    Trailing U+FFFD marks a character whose bytes have not all arrived: it is held back until they do,
    or until the request finishes. Example: "snow ❄" with the snowflake's 3 bytes split over two
    canvases emits "snow " after the first and "❄" after the second.

    Assumes what Hugging Face tokenizers' decoders do: decoding is local (a token's text depends on a
    few tokens around it), and a window starting where a character starts decodes without leading
    U+FFFD. The output then equals one decode of all tokens.
    """

    def __init__(self, tokenizer: Any | None, lookback: int = LOOKBACK) -> None:
        self.tokenizer = tokenizer
        self.lookback = lookback
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        """Where the decoded window starts: a character boundary, `lookback` tokens before read_offset."""
        self.read_offset = 0
        """Tokens whose text has been emitted whole."""
        self.num_pending_chars = 0
        """Characters emitted beyond the text of tokens[:read_offset] (a push that held back a tail)."""

    def push(self, new_token_ids: list[int], is_last: bool = False) -> str:
        """Add tokens; return the text that became final (everything left, when `is_last`)."""
        self.token_ids += new_token_ids
        if self.tokenizer is None:
            return ""
        base = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.token_ids))
        if is_last or not text.endswith(REPLACEMENT):
            read_offset, whole, final = len(self.token_ids), text, text
        else:
            read_offset = self._last_whole_char()
            whole = self._decode(self.prefix_offset, read_offset) if read_offset != self.read_offset else base
            # A character cut short can turn its whole run of byte tokens into U+FFFD: then the text up
            # to the last whole character is longer than the text without its trailing U+FFFD.
            held = text.rstrip(REPLACEMENT)
            final = held if len(held) > len(whole) else whole
        delta = final[len(base) + self.num_pending_chars :]
        num_emitted = max(len(final), len(base) + self.num_pending_chars)  # window characters out
        self.read_offset = read_offset
        self.num_pending_chars = max(0, num_emitted - len(whole))
        self._move_window()
        return delta

    def _decode(self, start: int, end: int) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True))

    def _last_whole_char(self) -> int:
        """The longest token prefix beyond `read_offset` whose text ends on a whole character, among
        the last MAX_CHAR_TOKENS positions; `read_offset` (no progress) if there is none."""
        end = len(self.token_ids)
        for cut in range(end - 1, max(self.read_offset, end - MAX_CHAR_TOKENS - 1), -1):
            if not self._decode(self.prefix_offset, cut).endswith(REPLACEMENT):
                return cut
        return self.read_offset

    def _move_window(self) -> None:
        """Start the window `lookback` tokens before `read_offset`, or earlier where that is inside a
        character (its text would begin with U+FFFD) or decodes to nothing (a decoder that strips the
        text's first space would strip the new text's); never before its current start. The pending
        characters lie beyond `read_offset`, so they do not change."""
        for start in range(self.read_offset - self.lookback, self.prefix_offset, -1):
            base = self._decode(start, self.read_offset)
            if base and not base.startswith(REPLACEMENT):
                self.prefix_offset = start
                return
