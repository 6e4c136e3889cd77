"""Cache tails: what an ended request left unwritten, written afterwards for the next turn (no torch).

A canvas's K/V enter the cache through the causal pass that commits it, which runs with the next
canvas's first denoise. A request's last canvas has no next canvas, so without more work it is never
written, and the next turn of a conversation (the prompt, the answer, the new message) misses the
answer's last canvas: usually the whole answer.

With prefix caching on (and `EngineConfig.cache_final_canvas`), a request that ends keeps its blocks as
a *cache tail*: the tokens a client's next prompt repeats and the request's cache lacks, cut down to
whole blocks (only full blocks are ever cached). The scheduler gives a tail one causal pass, at the
lowest priority: after every request's work, in the budget left, at most one canvas of tokens beside
request work (the whole budget in a step with none); then it registers the tail's full blocks and
frees its blocks, which stay cached. A tail never costs
a request anything else: where blocks are short it is dropped (its blocks freed) before any request is
preempted or refused admission, and an ending request that would complete no new block leaves none.

Which tokens the next prompt repeats:
- a request finished by a stop id: its output and that stop id (`canvas_end.repeated_tokens`): a chat
  template closes the model's turn with its end-of-turn token, a stop id (Gemma 4's `<turn|>`);
  nothing after it, which was never output;
- a request finished at max_tokens: its output, the last canvas cut there;
- an aborted request whose prompt was written (a client that hung up, or the API cutting the text at a
  stop string: the client's next prompt holds the text before it): its committed canvases whose commit
  pass has not run yet. An abort during the prompt's prefill leaves no tail.

Outputs never change: a tail writes only blocks of its own (its last partial block and new ones; shared
blocks are full and computed), and its blocks are registered only after the pass wrote them.

Limits: the next prompt hits only as far as its token ids equal the model's. Re-tokenising the answer's
text may give other ids (a BPE merge across a boundary), and a template that renders an earlier model
turn differently from the generation prompt (some Gemma 4 templates add an empty thought channel to the
generation prompt only) breaks the chain there: every block after the first difference misses.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request


@dataclass
class CacheTail:
    """The causal work an ended request leaves, and how far it got; it holds the request's block tables
    (under the same id) until `num_computed_tokens` reaches `len(token_ids)`."""

    request_id: str
    token_ids: list[int]
    """The cache's content up to the last whole block: prompt, committed canvases, repeated tokens."""
    num_computed_tokens: int
    """Positions scheduled (written by the step that scheduled them)."""
    cache_key: str | None

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


def cache_tail(request: Request, repeated: list[int], block_size: int) -> CacheTail | None:
    """The tail of `request`, ending now with `repeated` tokens of its last canvas uncommitted; None when
    it would complete no new block. Example, block size 4: 10 positions computed, cache tokens plus
    `repeated` 17 long: it writes positions [10, 16), completing blocks 2 and 3."""
    tokens = request.cache_token_ids + repeated
    end = len(tokens) // block_size * block_size
    if end <= request.num_computed_tokens:
        return None
    return CacheTail(request.request_id, tokens[:end], request.num_computed_tokens, request.cache_key)
