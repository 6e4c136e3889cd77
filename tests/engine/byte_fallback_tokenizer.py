"""A small Gemma-style tokenizer for detokenisation tests: BPE merges over "▁"-spaced text, byte
fallback for every character outside its vocabulary, special tokens that decoding skips."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHARS = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
MERGES = [
    ("h", "e"), ("l", "l"), ("l", "d"), ("o", "r"), ("▁", "t"), ("▁t", "he"), ("▁", "he"),
    ("▁he", "ll"), ("▁hell", "o"), ("▁", "w"), ("▁w", "or"), ("▁wor", "ld"), ("▁", "s"),
    ("n", "o"), ("▁s", "no"), ("▁sno", "w"),
]  # fmt: skip


def byte_fallback_tokenizer(strip_leading_space: bool = False) -> PreTrainedTokenizerFast:
    """Gemma's decoder (▁ -> space, byte fallback, fuse); with `strip_leading_space`, Llama's, which
    also drops the decoded text's first space."""
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in [*CHARS, *(a + b for a, b in MERGES)]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(BPE(vocab, MERGES, byte_fallback=True, fuse_unk=False))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_leading_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        clean_up_tokenization_spaces=False,
    )
