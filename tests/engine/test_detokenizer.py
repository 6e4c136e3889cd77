"""Incremental detokenisation never splits a UTF-8 character and loses no text."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer


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
