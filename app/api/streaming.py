"""Server-sent event streams of generated text."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from app.serving.generation import Chunk, Generator, GenParams


async def chunks(
    generator: Generator, prompt: str, params: GenParams, endpoint: str
) -> AsyncIterator[Chunk]:
    cancel = threading.Event()
    try:
        async for chunk in iterate_in_threadpool(
            generator.stream(prompt, params, cancel=cancel, endpoint=endpoint)
        ):
            yield chunk
    finally:
        cancel.set()  # the client went away: stop generating and free the version lock


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_response(
    source: AsyncIterator[Chunk], render: Callable[[Chunk], list[str]]
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in source:
                for line in render(chunk):
                    yield line
        except Exception as error:  # headers are gone already: report in-band
            yield sse({"detail": f"{type(error).__name__}: {error}"}, event="error")

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
