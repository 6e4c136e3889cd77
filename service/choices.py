"""One request's choices as engine requests: admission, stop strings, canvases, merged event streams.

A completion with several prompts or `n > 1` becomes several engine requests ("choices"). They are
admitted together (if one is refused, the others are aborted and the error is returned before any
byte is sent), then their events are merged as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.client import EngineClient, RequestStream
from engine.request import CanvasSnapshot, RequestOutput, SamplingParams, TokenLogprob, Usage


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceEvent:
    """A text delta, a canvas, and/or the end of one choice."""

    index: int
    text: str = ""
    canvas: dict[str, Any] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    """Entries of the tokens committed with this event (their text may be held back by a stop-string
    search and come in a later event)."""


ChoiceEnd = Callable[[str, Usage | None], None]
"""Told of each choice's end: its finish reason ("abort" when the client went away first) and usage."""


@dataclass
class StopMatcher:
    """Cuts a choice's text at the first stop string (excluded, as OpenAI does).

    Only the text not yet emitted is kept and searched: the last `max(len(stop)) - 1` characters of
    each delta are held back, since a stop string may begin there and end in the next delta, so a
    stop string spanning two commits is still found and nothing after it is ever emitted. Example,
    stop "END": "abcEN" emits "abc" and holds "EN"; then "Dxyz" completes "END": nothing more, hit.
    """

    stops: list[str]
    pending: str = ""
    """Text received but not emitted yet (at most the held-back tail between calls)."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit)."""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops if s) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((len(s) - 1 for s in self.stops), default=0)
        cut = max(0, len(self.pending) - keep)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class ChoiceRun:
    """Turns one engine request's outputs into choice events."""

    spec: ChoiceSpec
    stream: RequestStream
    tokenizer: Any
    stops: StopMatcher
    canvas_interval_s: float
    request_id: str
    on_end: ChoiceEnd | None = None
    last_canvas: float = field(default=-1e9)
    usage: Usage | None = None
    """The engine's usage so far (it comes with every committed canvas)."""
    finish_reason: str | None = None

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """The choice's events; a stop string found here ends the engine request as a "stop"."""
        try:
            async for output in self.stream:
                event = self._convert(output)
                if event is not None:
                    yield event
                if event is not None and event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                    self.usage = event.usage or self.usage
                    return
        finally:
            await self.stream.aclose("stop" if self.finish_reason == "stop" else "abort")
            if self.on_end is not None:
                self.on_end(self.finish_reason or "abort", self.usage)

    def _convert(self, output: RequestOutput) -> ChoiceEvent | None:
        self.usage = output.usage or self.usage
        text, hit = self.stops.feed(output.new_text)
        if output.finished and not hit:
            text += self.stops.flush()
        canvas = self._canvas(output.canvas, output.new_token_ids != [] or output.finished)
        if hit:
            return ChoiceEvent(self.spec.index, text, canvas, "stop", self._usage_at_stop(), output.logprobs)
        if not text and canvas is None and not output.finished and not output.logprobs:
            return None
        usage = output.usage if output.finished else None
        return ChoiceEvent(self.spec.index, text, canvas, output.finish_reason, usage, output.logprobs)

    def _canvas(self, snapshot: CanvasSnapshot | None, canvas_ended: bool) -> dict[str, Any] | None:
        if snapshot is None:
            return None
        now = time.monotonic()
        if not canvas_ended and now - self.last_canvas < self.canvas_interval_s:
            return None
        self.last_canvas = now
        return canvas_object(self.request_id, self.spec.index, snapshot, self.tokenizer)

    def _usage_at_stop(self) -> Usage:
        """Usage of a choice cut by a stop string: what the engine reported with the canvas that held
        it (tokens committed, denoise steps and canvases until then). A stop string is found in
        committed text, so a canvas has always been committed, with its usage, by then."""
        assert self.usage is not None, "a stop string was hit before any canvas was committed"
        return self.usage


def canvas_object(request_id: str, index: int, snapshot: CanvasSnapshot, tokenizer: Any) -> dict[str, Any]:
    """The `canvas` extension field: the current argmax canvas, a compact confidence (0-100) and the
    pinned positions (ascending: the request's `pinned_canvas` and a grammar's pinned skeleton)."""
    text = tokenizer.decode(snapshot.token_ids, skip_special_tokens=False) if tokenizer is not None else ""
    return {
        "request_id": request_id,
        "index": index,
        "canvas_index": snapshot.canvas_index,
        "step": snapshot.step,
        "text": text,
        "token_ids": snapshot.token_ids,
        "confidence": [round(100 * c) for c in snapshot.confidence],
        "num_accepted": snapshot.num_accepted,
        "mean_entropy": round(snapshot.mean_entropy, 5),
        "pinned": snapshot.pinned,
    }


async def admit_all(
    engine: EngineClient,
    specs: list[ChoiceSpec],
    request_id: str,
    want_canvas: bool,
    lora_name: str | None = None,
) -> list[RequestStream]:
    """Admit every choice (with adapter `lora_name`, None: the base model) or none: on the first
    refusal the admitted ones are aborted and it raises."""
    streams: list[RequestStream] = []
    try:
        for spec in specs:
            stream = await engine.submit(
                spec.prompt_token_ids,
                spec.params,
                f"{request_id}-{spec.index}",
                want_canvas,
                lora_name=lora_name,
            )
            streams.append(stream)
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    return streams


async def merge(runs: list[ChoiceRun]) -> AsyncGenerator[ChoiceEvent, None]:
    """Events of all choices in arrival order; closing the iterator aborts every unfinished choice."""
    if len(runs) == 1:
        async for event in runs[0].events():
            yield event
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        try:
            async for event in run.events():
                await queue.put(event)
        except BaseException as error:  # delivered to the consumer, which raises it
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
