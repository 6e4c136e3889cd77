"""A character-level Hugging Face tokenizer that `AutoTokenizer` loads: one token per character.

Used by the Sudoku model (recipes/sudoku/tokens.py) and by the tests' tiny checkpoints. The vocabulary
is a list of token strings whose index is the id; `specials` are added as special tokens (never split,
skipped when decoding with `skip_special_tokens`).
"""

from __future__ import annotations

from pathlib import Path


def save_char_tokenizer(
    path: Path,
    vocab: list[str],
    specials: list[str],
    chat_template: str,
    prepend_bos: bool = False,
    split_pattern: str = ".",
    padding_side: str = "right",
) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `path`.

    `vocab` must hold the Gemma specials `<pad>`, `<eos>`, `<bos>`, `<unk>`, `<mask>`; `prepend_bos`
    adds `<bos>` in front of every encoding, as Gemma's tokenizer does; `split_pattern` is the regex
    that cuts the text into tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(split_pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if prepend_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab.index("<bos>"))]
        )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side=padding_side,
    )
    fast.save_pretrained(path)
    (path / "chat_template.jinja").write_text(chat_template)
