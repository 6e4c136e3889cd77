"""Grammar-constrained commits: compile a `GrammarSpec` with xgrammar and decode a canvas under it.

A constrained request denoises like any other; when its canvas finishes, the canvas is decoded left
to right under the grammar's token mask from the final step's logits: at each position the argmax
token is kept if the grammar accepts it, else the most likely token the grammar allows is taken.
The grammar state is carried across canvases (each canvas resumes after the request's output so
far), and the grammar's end is the output's end: the stop id it accepts there ends the request with
"stop"; running out of `max_tokens` first ends it with "length". Only constrained requests pay: the
mask is filled only where the argmax is refused (or everywhere when logprobs need it).

JSON is generated compactly (no free whitespace), so that a model cannot pad the output with spaces
until `max_tokens` runs out.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr
from torch import Tensor

from engine.request import GrammarSpec, InvalidParams
from engine.schema_features import unsupported_features

MAX_SPEC_CHARS = 65_536
"""The longest schema, regex, choice list or grammar a request may give (characters)."""

CACHED_GRAMMARS = 128
"""Compiled grammars kept, least recently used dropped first."""

_BITS = torch.arange(32, dtype=torch.int32)
"""Bit j of bitmask word w allows token 32 * w + j."""


class GrammarCompiler:
    """Compiles grammar specs for one tokenizer and vocabulary; the last `CACHED_GRAMMARS` compiled
    grammars are cached by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar; raises `InvalidParams` naming what is wrong with the spec."""
        compiled = self._cache.get(spec)
        if compiled is not None:
            self._cache.move_to_end(spec)
            return compiled
        if len(spec.value) > MAX_SPEC_CHARS:
            raise InvalidParams(
                f"{spec.kind} has {len(spec.value)} characters; at most {MAX_SPEC_CHARS}", spec.kind
            )
        compiled = self._compile(spec)
        self._cache[spec] = compiled
        if len(self._cache) > CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec, stop_token_ids: tuple[int, ...], prefix: tuple[int, ...]) -> Any:
        """A matcher for `spec` that ends on any of `stop_token_ids`, advanced over `prefix`."""
        matcher = xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=list(stop_token_ids))
        for token in prefix:
            if not matcher.accept_token(token):
                raise RuntimeError(f"the grammar refused token {token} of an output it produced")
        return matcher

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        compiler = self._xgrammar()
        try:
            compiled = _compile_with(compiler, spec)
        except InvalidParams:
            raise
        except (RuntimeError, ValueError, TypeError) as error:  # xgrammar's parse errors
            raise InvalidParams(
                f"{spec.kind} could not be compiled: {_first_line(error)}", spec.kind
            ) from None
        if not allowed_tokens(_first_mask(compiled), self.vocab_size).any():
            raise InvalidParams(f"this {spec.kind} matches no output at all", spec.kind)
        return compiled

    def _xgrammar(self) -> xgr.GrammarCompiler:
        if self.tokenizer is None:
            raise InvalidParams("this model has no tokenizer: structured outputs need one", "response_format")
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.stop_token_ids)
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler


def _compile_with(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    if spec.kind == "json_schema":
        schema = _json(spec.value, "json_schema")
        problems = unsupported_features(schema)
        if problems:
            raise InvalidParams(
                f"the JSON schema uses unsupported features: {'; '.join(problems)}", "json_schema"
            )
        return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
    if spec.kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=True)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.value)
    if spec.kind == "choice":
        return compiler.compile_grammar(choice_grammar(_json(spec.value, "choice")))
    return compiler.compile_grammar(spec.value)


def _first_mask(compiled: xgr.CompiledGrammar) -> Tensor:
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    return bitmask


def choice_grammar(choices: Any) -> str:
    """EBNF whose language is exactly `choices` (a non-empty list of strings)."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidParams("choice must be a non-empty list of strings", "choice")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidParams(f"{param} is not valid JSON: {error}", param) from None


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else repr(error)
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


CANDIDATES = 16
"""Most likely tokens of a position looked up in a dense mask before the whole row is masked."""

SPARSE_WORDS = 256
"""A mask with at most this many non-zero 32-bit words is searched through its allowed ids."""


def decode_under_grammar(
    logits: Tensor, argmax: list[int], matcher: Any, budget: int, mask_every: bool
) -> tuple[list[int], bool]:
    """Decode a canvas left to right under the grammar: logits [C, V] fp32 (temperature 1), argmax [C].

    Position i takes the most likely token the grammar allows there: its argmax when the grammar
    accepts it (no mask needed), else the best allowed token (`masked_argmax`). With `mask_every`
    (logprobs are then taken under the mask) every decoded row of `logits` is overwritten with -inf at
    disallowed tokens, and the choice is the same: `argmax[i]` when allowed (at a pinned position it is
    the pin, not the logits' argmax), else the masked row's argmax. Stops after the grammar's stop
    token (the last token returned) or after `budget` tokens. Advances `matcher`. Returns (tokens,
    whether the grammar ended); a grammar that allows nothing at some point (a recursion with no way
    out) ends there with its stop token.
    """
    vocab_size = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32
    tokens: list[int] = []
    for i in range(min(len(argmax), budget)):
        if matcher.is_terminated():
            return tokens, True
        if not mask_every and matcher.accept_token(argmax[i]):
            tokens.append(argmax[i])
            continue
        matcher.fill_next_token_bitmask(bitmask)
        if mask_every:
            allowed = allowed_tokens(bitmask, vocab_size)  # [V] bool
            row = logits[i].masked_fill_(~allowed.to(logits.device), -float("inf"))
            token = argmax[i] if bool(allowed[argmax[i]]) else int(row.argmax())
        else:
            token = masked_argmax(logits[i], bitmask)
        if not matcher.accept_token(token):  # nothing allowed: a dead end
            return [*tokens, matcher.stop_token_ids[0]], True
        tokens.append(token)
    return tokens, matcher.is_terminated()


def masked_argmax(row: Tensor, bitmask: Tensor) -> int:
    """The most likely token of row [V] that bitmask [1, W] allows, without masking the whole row.

    A sparse mask (structure: a quote, a colon, a digit) is searched through its allowed ids; a dense
    one (free text) first through the row's `CANDIDATES` most likely tokens, as one of them is almost
    always allowed. Returns 0 when nothing is allowed.
    """
    vocab_size = row.shape[0]
    words = bitmask[0]  # [W] int32
    if int(words.count_nonzero()) <= SPARSE_WORDS:
        ids = allowed_ids(bitmask, vocab_size).to(row.device)  # [n]
        return int(ids[row[ids].argmax()]) if ids.numel() else 0
    bits = words.numpy()
    for token in row.topk(min(CANDIDATES, vocab_size)).indices.tolist():
        if (int(bits[token >> 5]) >> (token & 31)) & 1:
            return int(token)
    allowed = allowed_tokens(bitmask, vocab_size).to(row.device)  # [V]
    return int(torch.where(allowed, row, -float("inf")).argmax())


def allowed_tokens(bitmask: Tensor, vocab_size: int) -> Tensor:
    """Unpack an xgrammar bitmask [1, W] int32 into a bool mask [vocab_size]."""
    bits = (bitmask[0, :, None] >> _BITS) & 1  # [W, 32]
    return bits.view(-1)[:vocab_size].bool()


def allowed_ids(bitmask: Tensor, vocab_size: int) -> Tensor:
    """The allowed token ids of an xgrammar bitmask [1, W] int32, ascending: [n] long.

    Only the non-zero words are unpacked, so a mask allowing a few tokens costs little.
    """
    words = bitmask[0].nonzero().squeeze(1)  # [w]
    bits = ((bitmask[0, words, None] >> _BITS) & 1).bool()  # [w, 32]
    ids = words[:, None] * 32 + _BITS.to(torch.long)  # [w, 32]
    ids = ids[bits]  # [n]
    return ids[ids < vocab_size]
