"""The engine's per-token logprobs in OpenAI's two shapes (completions and chat), whole or per chunk.

What the numbers mean is defined once in `engine.logprobs` (and the README's API section). Each token
is shown as its own decoded text, as the output text shows it (special tokens are empty); the chat
shape adds its UTF-8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.request import TokenLogprob


class LogprobFormatter(Protocol):
    """Formats one choice's next entries; called in output order, so it may keep per-choice state."""

    def __call__(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]: ...


@dataclass
class CompletionLogprobFormatter:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; offsets continue across calls."""

    tokenizer: Any
    start_offsets: dict[int, int] = field(default_factory=dict)
    """Per choice: the text offset of its first token (the echoed prompt's length)."""
    _offsets: dict[int, int] = field(default_factory=dict)

    def __call__(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens = [_text(self.tokenizer, e.token_id) for e in entries]
        offset = self._offsets.get(index, self.start_offsets.get(index, 0))
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(self.tokenizer, t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


@dataclass
class ChatLogprobFormatter:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}`."""

    tokenizer: Any

    def __call__(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [self._entry(e) for e in entries], "refusal": None}

    def _entry(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            **self._token(entry.token_id, entry.logprob),
            "top_logprobs": [self._token(t, lp) for t, lp in entry.top],
        }

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = _text(self.tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id], skip_special_tokens=True))
