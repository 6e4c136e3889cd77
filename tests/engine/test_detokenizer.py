"""Incremental detokenisation never splits a UTF-8 character and loses no text."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer
from tests.engine.byte_fallback_tokenizer import byte_fallback_tokenizer

BOS = 2


class ByteTokenizer:
    """Token id = one byte (ids 0-255); 256 is a special token that decoding may skip."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")


def test_a_character_split_across_pushes_is_held_back_then_emitted_whole() -> None:
    text = "snow ❄ and 雪!"
    data = list(text.encode())
    cut = text.encode().index("❄".encode()) + 1  # inside the 3-byte snowflake
    detok = IncrementalDetokenizer(ByteTokenizer())
    first = detok.push(data[:cut])
    assert first == "snow "
    second = detok.push(data[cut : cut + 1])
    assert second == ""  # still one byte short
    rest = detok.push(data[cut + 1 :], is_last=True)
    assert first + second + rest == text


def test_every_split_point_reassembles_the_text() -> None:
    text = "añ€😀z"
    data = list(text.encode())
    for cut in range(len(data) + 1):
        detok = IncrementalDetokenizer(ByteTokenizer())
        pieces = [detok.push(data[:cut]), detok.push(data[cut:], is_last=True)]
        assert "".join(pieces) == text
        assert "\ufffd" not in pieces[0]


def test_special_tokens_and_no_tokenizer() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.push([256]) == ""
    assert detok.push([104, 105], is_last=True) == "hi"
    assert IncrementalDetokenizer(None).push([1, 2], is_last=True) == ""


def test_a_truncated_character_at_the_end_is_flushed() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.push(list("é".encode())[:1], is_last=True) == "\ufffd"


# -- a real (Hugging Face) tokenizer: merges, "▁" spacing, byte fallback, skipped specials ---------

TRICKY = [
    " hello world, the ❄ snow 雪 and 😀!",
    "héllo wörld 👍🏽 the snow",  # 2-byte characters, an emoji with a skin-tone modifier
    "雪雪雪 😀😀 ❄",  # byte-fallback characters back to back
    "a\u0301 ok",  # a combining accent
]


def pieces(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = [0, *sorted(cuts), len(ids)]
    return [ids[a:b] for a, b in itertools.pairwise(bounds)]


def detokenize(tokenizer: Any, chunks: list[list[int]], lookback: int = 6) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, lookback)
    return [detok.push(chunk, is_last=i == len(chunks) - 1) for i, chunk in enumerate(chunks)]


@pytest.mark.parametrize("strip", [False, True], ids=["gemma-decoder", "llama-decoder"])
@pytest.mark.parametrize("text", TRICKY)
def test_every_split_equals_one_full_decode(text: str, strip: bool) -> None:
    tokenizer = byte_fallback_tokenizer(strip_leading_space=strip)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = [BOS, *ids[:5], BOS, *ids[5:]]  # special tokens, skipped, one inside the text
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in full and full.strip() == text.strip()
    splits = [[cut] for cut in range(len(ids) + 1)] + [list(range(1, len(ids)))]  # one cut; every token
    rng = random.Random(0)
    splits += [rng.sample(range(1, len(ids)), min(k, len(ids) - 1)) for k in (2, 3, 5, 8) for _ in range(10)]
    for cuts in splits:
        deltas = detokenize(tokenizer, pieces(ids, cuts), lookback=rng.choice([1, 2, 6]))
        assert "".join(deltas) == full, cuts
        assert not any("\ufffd" in delta for delta in deltas), (cuts, deltas)


def test_a_multi_byte_character_split_across_commits_is_emitted_whole_with_the_commit_completing_it() -> None:
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer("the ❄ snow", add_special_tokens=False).input_ids
    first = ids.index(tokenizer.convert_tokens_to_ids("<0xE2>"))  # the snowflake's first byte
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[: first + 2]) == "the "  # two of three bytes: held back
    assert detok.push(ids[first + 2 : first + 3]) == "❄"
    assert detok.push(ids[first + 3 :], is_last=True) == " snow"


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it decodes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return str(self.inner.decode(ids, skip_special_tokens=skip_special_tokens))


def test_each_push_decodes_the_new_tokens_and_a_short_lookback_not_the_whole_output() -> None:
    tokenizer = CountingTokenizer(byte_fallback_tokenizer())
    ids = tokenizer.inner("hello world, the ❄ snow 雪 " * 40, add_special_tokens=False).input_ids
    canvas = 16
    detok = IncrementalDetokenizer(tokenizer, lookback=6)
    text, per_push = "", []
    for start in range(0, len(ids), canvas):
        before = tokenizer.decoded
        text += detok.push(ids[start : start + canvas], is_last=start + canvas >= len(ids))
        per_push.append(tokenizer.decoded - before)
    assert text == tokenizer.inner.decode(ids, skip_special_tokens=True)
    assert len(ids) > 30 * canvas
    # the base and the window (new tokens, lookback, a held-back character), plus a few short
    # decodes that look for character boundaries: bounded, whatever the length of the output
    assert max(per_push) <= 2 * (canvas + 6 + 4) + 8 * (canvas + 6 + 4), per_push
