"""The contracts between scheduler and runner (no torch): what to run, and what came of it.

`Scheduler.schedule()` -> `SchedulerOutput` -> `ModelRunner.execute()` -> `RunnerOutput` ->
`Scheduler.update()`. Everything here is plain Python so that the scheduler can be tested with
hand-built runner outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import GrammarSpec, StepParams, TokenLogprob


@dataclass(frozen=True)
class CausalWork:
    """Encoder pass over `token_ids` at positions [start_pos, start_pos + len): writes the cache.

    A prompt chunk or (part of) a committed canvas.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_tables: dict[str, list[int]]
    lora_id: int | None = None
    """The request's adapter (its per-load id); None: the base model."""


@dataclass(frozen=True)
class CommitSpec:
    """How the runner commits a finished canvas of a request that asks for more than its argmax.

    `grammar`: decode the canvas left to right under the grammar's token mask, resuming the grammar
    after `grammar_prefix` (the request's output so far) and decoding at most `budget` positions (the
    output tokens left). `logprobs`: report each position's log-probability and that many alternatives.
    """

    logprobs: int | None = None
    grammar: GrammarSpec | None = None
    grammar_prefix: tuple[int, ...] = ()
    budget: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    """The request's stop ids: the grammar ends on one of them."""
    pin_skeleton: bool = False
    """Guided denoising: pin the text the grammar forces at the canvas's start (`engine.guided_denoise`)."""
    renoise: bool = False
    """Guided denoising: after each step, re-noise the first accepted token the grammar refuses."""


@dataclass(frozen=True)
class NewCanvas:
    """Draw a fresh canvas number `canvas_index` of a request before its denoise pass.

    The runner seeds the canvas's generator from (seed, canvas_index), so a request that is preempted
    and recomputed draws exactly the same canvas again.
    """

    seed: int
    canvas_index: int
    stability_threshold: int
    pinned_canvas: tuple[int, ...] | None = None
    commit: CommitSpec | None = None
    """None: commit the argmax canvas as it is (what most requests do)."""


@dataclass(frozen=True)
class DenoiseWork:
    """One denoise step of the request's canvas at positions [start_pos, start_pos + C).

    `new_canvas` is set on the first step of a canvas. `want_canvas` asks the runner to report the
    argmax canvas and confidences after the step (for live streaming), not only when it finishes.
    """

    request_id: str
    start_pos: int
    block_tables: dict[str, list[int]]
    params: StepParams
    new_canvas: NewCanvas | None = None
    want_canvas: bool = False
    lora_id: int | None = None
    """The request's adapter (its per-load id); None: the base model."""


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: causal work first, then denoise work (a denoise may read what a causal work of the
    same step wrote). `dropped_request_ids` are requests the runner must forget (finished, aborted or
    preempted since the last step)."""

    causal: list[CausalWork] = field(default_factory=list)
    denoise: list[DenoiseWork] = field(default_factory=list)
    dropped_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.causal and not self.denoise

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The requests with work in this step, each once: causal work first, then denoise work."""
        ids = [c.request_id for c in self.causal] + [d.request_id for d in self.denoise]
        return tuple(dict.fromkeys(ids))


@dataclass(frozen=True)
class DenoiseOutcome:
    """What one denoise step did to one canvas.

    `argmax` (the canvas's current argmax tokens; on a finished canvas with a `CommitSpec` grammar, the
    canvas decoded under the grammar, which may end early with a stop id) and `confidence` (probability
    of each argmax token) are filled when the canvas finished or when the work asked for them; otherwise
    None, which keeps device-to-host traffic to a few scalars per canvas.
    """

    step: int
    finished: bool
    num_accepted: int
    mean_entropy: float
    argmax: list[int] | None = None
    confidence: list[float] | None = None
    logprobs: list[TokenLogprob] | None = None
    """One entry per `argmax` position of a finished canvas whose request asked for logprobs (for a
    grammar-constrained canvas: up to where the grammar ended or the budget ran out)."""
    pinned: list[int] | None = None
    """Positions of the canvas that are pinned (the request's `pinned_canvas` and a grammar's pinned
    skeleton), ascending; filled with `confidence`."""


@dataclass(frozen=True)
class RunnerOutput:
    """One outcome per denoise work, by request id."""

    outcomes: dict[str, DenoiseOutcome] = field(default_factory=dict)
