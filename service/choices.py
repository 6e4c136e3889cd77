"""One request's choices as engine requests: admission, stop strings, canvases, merged event streams.

A completion with several prompts or `n > 1` becomes several engine requests ("choices"). They are
admitted together (if one is refused, the others are aborted and the error is returned before any
byte is sent), then their events are merged as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.async_engine import AsyncEngine, RequestStream
from engine.request import CanvasSnapshot, RequestOutput, SamplingParams, Usage


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


@dataclass
class StopMatcher:
    """Cuts a choice's text at the first stop string (excluded, as OpenAI does)."""

    stops: list[str]
    text: str = ""
    emitted: int = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.emitted = self.text[self.emitted : cut], cut
            return out, True
        keep = max((len(s) - 1 for s in self.stops), default=0)  # a stop may be split across deltas
        safe = max(self.emitted, len(self.text) - keep)
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
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
    last_canvas: float = field(default=-1e9)
    num_tokens: int = 0

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        try:
            async for output in self.stream:
                event = self._convert(output)
                if event is not None:
                    yield event
                if event is not None and event.finish_reason is not None:
                    return
        finally:
            await self.stream.aclose()

    def _convert(self, output: RequestOutput) -> ChoiceEvent | None:
        self.num_tokens += len(output.new_token_ids)
        text, hit = self.stops.feed(output.new_text)
        if output.finished and not hit:
            text += self.stops.flush()
        canvas = self._canvas(output.canvas, output.new_token_ids != [] or output.finished)
        if hit:
            return ChoiceEvent(self.spec.index, text, canvas, "stop", output.usage or self._usage_so_far())
        if not text and canvas is None and not output.finished:
            return None
        return ChoiceEvent(self.spec.index, text, canvas, output.finish_reason, output.usage)

    def _canvas(self, snapshot: CanvasSnapshot | None, canvas_ended: bool) -> dict[str, Any] | None:
        if snapshot is None:
            return None
        now = time.monotonic()
        if not canvas_ended and now - self.last_canvas < self.canvas_interval_s:
            return None
        self.last_canvas = now
        return canvas_object(self.request_id, self.spec.index, snapshot, self.tokenizer)

    def _usage_so_far(self) -> Usage:
        """Usage of a choice cut by a stop string: the tokens committed until then."""
        return Usage(len(self.spec.prompt_token_ids), self.num_tokens, 0, 0)


def canvas_object(request_id: str, index: int, snapshot: CanvasSnapshot, tokenizer: Any) -> dict[str, Any]:
    """The `canvas` extension field: the current argmax canvas and a compact confidence (0-100)."""
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
    }


async def admit_all(
    engine: AsyncEngine, specs: list[ChoiceSpec], request_id: str, want_canvas: bool
) -> list[RequestStream]:
    """Admit every choice or none: on the first refusal the admitted ones are aborted and it raises."""
    streams: list[RequestStream] = []
    try:
        for spec in specs:
            stream = await engine.submit(
                spec.prompt_token_ids, spec.params, f"{request_id}-{spec.index}", want_canvas
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
