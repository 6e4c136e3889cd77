"""The Sudoku model's vocabulary and the prompt/canvas layout, plus the Hugging Face tokenizer files.

Ids: the Gemma specials first (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4, so the engine's
pad/eos/bos defaults hold), then `.` 5, `1`..`9` 6..14, newline 15, unused ids 16..28 and the three
image ids the DiffusionGemma config requires (29..31; never produced by this model). 32 in all.

Layout: prompt = `<bos>` + the 81 puzzle characters at positions 0..81; canvas = the 81 solution digits +
`<eos>` (82 tokens) at positions 82..163. A cell's canvas position is exactly 81 after its prompt
position, a multiple of 9, so "same column" is a fixed relative offset modulo 9 for RoPE.
"""

from __future__ import annotations

from pathlib import Path

from recipes.char_tokenizer import save_char_tokenizer
from recipes.sudoku.puzzles import CELLS

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PAD, EOS, BOS, UNK, MASK = range(5)
BLANK = 5
DIGIT0 = 5  # digit d (1..9) has id DIGIT0 + d
NEWLINE = 15
IMAGE_TOKENS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
BOI, IMAGE, EOI = 29, 30, 31
VOCAB = [*SPECIALS, ".", *"123456789", "\n", *(f"<unused{i}>" for i in range(13)), *IMAGE_TOKENS]
VOCAB_SIZE = len(VOCAB)
CANVAS_LENGTH = CELLS + 1
PROMPT_LENGTH = CELLS + 1
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""Chat requests carry the puzzle as the message content; the model sees the same ids as a completion."""

assert VOCAB_SIZE == 32 and VOCAB[BOI] == "<start_of_image>"


def prompt_ids(puzzle: list[int]) -> list[int]:
    """`<bos>` then one id per cell (`.` for blanks)."""
    return [BOS, *(DIGIT0 + d if d else BLANK for d in puzzle)]


def canvas_ids(solution: list[int]) -> list[int]:
    """The training target: 81 digit ids then `<eos>`."""
    return [*(DIGIT0 + d for d in solution), EOS]


def grid_from_ids(ids: list[int]) -> list[int]:
    """Digits of the first 81 ids (0 for anything that is not a digit)."""
    return [i - DIGIT0 if DIGIT0 < i <= DIGIT0 + 9 else 0 for i in ids[:CELLS]] + [0] * (CELLS - len(ids))


def pinned_clues(puzzle: list[int], free: int = -1) -> tuple[int, ...]:
    """An infilling seed canvas: each clue's digit id at its cell, `free` elsewhere (and at `<eos>`)."""
    return (*(DIGIT0 + d if d else free for d in puzzle), free)


def save_tokenizer(path: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for `AutoTokenizer`.

    Character-level: every character is one token; `<bos>` is prepended, as Gemma's tokenizer does.
    """
    save_char_tokenizer(
        path,
        VOCAB,
        SPECIALS + IMAGE_TOKENS,
        CHAT_TEMPLATE,
        prepend_bos=True,
        split_pattern="(?m).",
        padding_side="left",
    )
