"""Server-sent events in OpenAI's streaming format, with live canvases as ordinary chunks.

Every event is `data: <json>\\n\\n` with no event name (the official `openai` client yields named
events with `choices=None`, which breaks ordinary loops); the stream always ends with
`data: [DONE]`. A canvas update is a chunk of the same object type with empty text (chat: an empty
delta) and a top-level `canvas` object, which the `openai` client exposes as
`chunk.model_extra["canvas"]`. A failure after the stream started is sent in band as
`data: {"error": {...}}` before `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from service.choices import ChoiceEvent
from service.errors import as_api_error
from service.logprobs import LogprobFormatter
from service.protocol import UsageInfo
from service.serving import Accepted, add_usage

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"

ChunkBuilder = Callable[[int, str | None, str | None, dict[str, Any] | None], dict[str, Any]]
"""(choice index, text delta or None for a canvas-only chunk, finish reason, logprobs) -> one choice entry."""


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def completion_choice(
    index: int, text: str | None, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int, text: str | None, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


async def stream_events(
    accepted: Accepted,
    model: str,
    object_type: str,
    choice: ChunkBuilder,
    include_usage: bool,
    first_chunks: list[dict[str, Any]] | None = None,
    logprobs: LogprobFormatter | None = None,
) -> AsyncIterator[str]:
    """The SSE body of one request. Closing it (client gone) aborts every unfinished choice.

    With `logprobs`, a chunk carries the entries of the tokens committed with its event."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse(
            {
                "id": accepted.request_id,
                "object": object_type,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    usage = UsageInfo(prompt_tokens=accepted.prompt_tokens)
    try:
        for first in first_chunks or []:
            yield chunk([first])
        async for event in accepted.events:
            entries = (
                None if logprobs is None or event.logprobs is None else logprobs(event.index, event.logprobs)
            )
            for line in _event_chunks(event, choice, chunk, entries):
                yield line
            if event.finish_reason is not None:
                add_usage(usage, event.usage)
        if include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield chunk([], usage=usage.model_dump())
    except Exception as error:  # the 200 is already sent: report in band
        logger.exception("stream %s failed", accepted.request_id)
        yield sse(as_api_error(error).body())
    finally:
        await accepted.events.aclose()
    yield DONE


def _event_chunks(
    event: ChoiceEvent, choice: ChunkBuilder, chunk: Callable[..., str], logprobs: dict[str, Any] | None
) -> list[str]:
    """A canvas chunk (if any) first, then the committed text, logprobs and/or the finish reason."""
    lines = []
    if event.canvas is not None:
        lines.append(chunk([choice(event.index, None, None, None)], canvas=event.canvas))
    if event.text or event.finish_reason is not None or logprobs is not None:
        lines.append(chunk([choice(event.index, event.text, event.finish_reason, logprobs)]))
    return lines
