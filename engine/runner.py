"""ModelRunner: turns one `SchedulerOutput` into a flat batch, runs the model and the sampler.

The runner owns the tensors (K/V caches, canvases, generators); it knows requests only by id and
never allocates cache blocks: block tables arrive with the work, decided by the scheduler.

Ordering invariant: in every layer, causal work runs before denoise work, so a request's denoise may
read K/V that a causal work of the same step wrote (its prompt's last chunk or the commit of its
previous canvas). This saves one forward per canvas.

The attention backend is chosen once, at construction, for the model's device
(`engine.attention.selection`); each batch binds it to that batch's metadata, prepared once for all
layers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from engine.attention.selection import select_attention_backend
from engine.attention.types import LayerCache, Segment
from engine.commit import CanvasCommit
from engine.guided import GrammarCompiler
from engine.lora.manager import LoRAManager
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from engine.outputs import DenoiseOutcome, DenoiseWork, NewCanvas, RunnerOutput, SchedulerOutput
from engine.packed_sampler import step_canvases
from engine.request import FREE, TokenLogprob
from engine.sampler import CanvasState, LMHead, StepResult, init_canvas


def canvas_seed(seed: int, canvas_index: int) -> int:
    """The generator seed of one canvas: a request's canvases draw independent, reproducible streams.

    Seeding per canvas (not once per request) lets a preempted request recompute from any canvas and
    draw exactly the tokens it would have drawn.
    """
    return (seed * 0x9E3779B1 + canvas_index * 0x85EBCA77 + 0x27D4EB2F) % (2**63 - 1)


class ModelRunner:
    """Executes `SchedulerOutput`s on one model and one set of paged caches."""

    def __init__(
        self,
        model: DiffusionGemma,
        caches: list[LayerCache],
        grammars: GrammarCompiler | None = None,
        lora: LoRAManager | None = None,
        compiled: bool = False,
    ) -> None:
        """`grammars` compiles the grammars of constrained requests (None: the engine admits none);
        `lora` applies each work's adapter (None: LoRA is off); `compiled` (the engine's `--compile`)
        also looks the head's soft-cap up in a table where inductor can build the lookup."""
        self.model = model
        self.grammars = grammars
        self.lora = lora
        self.caches = caches
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.attention = select_attention_backend(self.device)
        head = LMHead(weight, model.config.final_logit_softcapping, model.embed_scale).prepacked()
        self.head = head.with_table() if compiled else head
        self.canvases: dict[str, CanvasState] = {}
        self.commits: dict[str, CanvasCommit] = {}
        """Requests whose current canvas commits with a grammar or logprobs (`NewCanvas.commit`)."""
        self.pinned: dict[str, list[int]] = {}
        """Each canvas's pinned positions (for live views)."""

    def start_canvas(self, request_id: str, spec: NewCanvas) -> None:
        """Draw a fresh uniform canvas number `spec.canvas_index` of the request (with a grammar's
        skeleton pinned when its commit spec asks)."""
        generator = torch.Generator(device=self.device).manual_seed(canvas_seed(spec.seed, spec.canvas_index))
        config = self.model.config
        self.commits.pop(request_id, None)
        pins = spec.pinned_canvas
        if spec.commit is not None:
            commit = self.commits[request_id] = self._canvas_commit(spec)
            pins = commit.pins(pins, config.canvas_length)
        self.canvases[request_id] = init_canvas(
            config.canvas_length, config.vocab_size, spec.stability_threshold, generator, pins, self.device
        )
        self.pinned[request_id] = [] if pins is None else [p for p, t in enumerate(pins) if t != FREE]

    def _canvas_commit(self, spec: NewCanvas) -> CanvasCommit:
        commit = spec.commit
        assert commit is not None
        if commit.grammar is None:
            return CanvasCommit(commit)
        assert self.grammars is not None, "a constrained request reached a runner without a grammar compiler"
        matcher = self.grammars.matcher(commit.grammar, commit.stop_token_ids, commit.grammar_prefix)
        return CanvasCommit(commit, matcher)

    def drop_canvas(self, request_id: str) -> None:
        self.canvases.pop(request_id, None)
        self.commits.pop(request_id, None)
        self.pinned.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        """Run one forward over all work, then one sampler step for every denoised canvas."""
        for request_id in work.dropped_request_ids:
            self.drop_canvas(request_id)
        for d in work.denoise:
            if d.new_canvas is not None:
                self.start_canvas(d.request_id, d.new_canvas)
        if work.is_empty:
            return RunnerOutput()
        batch = self._build_batch(work)
        with self._adapters(batch, work):
            hidden = self.model(batch, self.caches)  # (num_denoise * C, H)
        if not work.denoise:
            return RunnerOutput()
        states = [self.canvases[w.request_id] for w in work.denoise]
        results = step_canvases(hidden, self.head, states, [w.params for w in work.denoise])
        outcomes = {}
        for i, (w, r) in enumerate(zip(work.denoise, results, strict=True)):
            committed = self._commit(w.request_id, r, hidden, i)
            self._guide(w.request_id, r)
            outcomes[w.request_id] = _outcome(w, r, self.pinned[w.request_id], *committed)
        return RunnerOutput(outcomes)

    def _commit(
        self, request_id: str, result: StepResult, hidden: Tensor, index: int
    ) -> tuple[list[int] | None, list[TokenLogprob] | None]:
        """(canvas, logprobs) of a finished canvas with a commit spec; (None, None) for every other."""
        commit = self.commits.get(request_id)
        if commit is None or not result.finished:
            return None, None
        canvas_length = self.model.config.canvas_length
        tile = hidden[index * canvas_length : (index + 1) * canvas_length]  # [C, H]
        return commit.commit(tile, self.head, result.argmax)

    def _guide(self, request_id: str, result: StepResult) -> None:
        """Guided denoising of a constrained canvas that goes on (`CanvasCommit.guide`)."""
        commit = self.commits.get(request_id)
        if commit is not None and not result.finished:
            commit.guide(self.canvases[request_id], self.model.config.vocab_size)

    def _build_batch(self, work: SchedulerOutput) -> ForwardBatch:
        """Causal token ids and all positions go to the device in one copy each; canvases are there."""
        prompt_ids = [t for c in work.causal for t in c.token_ids]
        segments = [Segment(len(c.token_ids), c.start_pos, True, c.block_tables) for c in work.causal]
        canvas_length = self.model.config.canvas_length
        segments += [Segment(canvas_length, d.start_pos, False, d.block_tables) for d in work.denoise]
        tokens = [torch.tensor(prompt_ids, dtype=torch.long).to(self.device)]
        tokens += [self.canvases[d.request_id].tokens for d in work.denoise]
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos) for s in segments])  # (T,) host
        return ForwardBatch(
            input_ids=torch.cat(tokens),
            positions=positions.to(self.device),
            segments=segments,
            soft_embeds=self._soft_embeds(work.denoise),
            attention=self.attention.bind(segments, self.caches),
        )

    def _adapters(self, batch: ForwardBatch, work: SchedulerOutput) -> AbstractContextManager[None]:
        """The context of the forward: each segment's adapter bound (one index per step), or nothing."""
        if self.lora is None:
            return nullcontext()
        load_ids = [c.lora_id for c in work.causal] + [d.lora_id for d in work.denoise]
        return self.lora.bind(batch.segments, load_ids)

    def _soft_embeds(self, denoise: list[DenoiseWork]) -> Tensor | None:
        """Self-conditioning inputs in denoise order; zeros for canvases on their first step."""
        states = [self.canvases[d.request_id] for d in denoise]
        if all(s.self_cond is None for s in states):
            return None
        shape = (self.model.config.canvas_length, self.model.config.hidden_size)
        zeros = torch.zeros(shape, dtype=self.head.weight.dtype, device=self.device)
        return torch.cat([zeros if s.self_cond is None else s.self_cond for s in states])


def _outcome(
    work: DenoiseWork,
    result: StepResult,
    pinned: list[int],
    committed: list[int] | None = None,
    logprobs: list[TokenLogprob] | None = None,
) -> DenoiseOutcome:
    """Plain-Python view of a step; the canvas itself only when finished or asked for (`committed`
    replaces the argmax of a canvas that commits with a grammar)."""
    show = result.finished or work.want_canvas
    argmax = (
        committed if committed is not None else [int(t) for t in result.argmax.tolist()] if show else None
    )
    return DenoiseOutcome(
        step=result.step,
        finished=result.finished,
        num_accepted=result.num_accepted,
        mean_entropy=result.mean_entropy,
        argmax=argmax,
        confidence=[round(float(c), 3) for c in result.confidence.tolist()] if work.want_canvas else None,
        logprobs=logprobs,
        pinned=pinned if work.want_canvas else None,
    )
