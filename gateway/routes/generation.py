"""What chat and legacy completions share: run the request, then stream it or fold it into one body.

Stream and non-stream use one event iterator (the non-stream path folds it). The first engine event is
awaited before any byte is sent, so admission, model-load and context-length failures are real HTTP
errors; once SSE headers are out, a failure is one `data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from litestar import Request, Response
from litestar.response import Stream

from gateway import sse
from gateway.convert import ResponseMeta, public_finish_reason
from gateway.errors import ErrorKind, GatewayError, internal
from gateway.lifecycle import GatewayRuntime
from gateway.protocol import ChatCompletion, Completion
from mlx_backend.engine import GenerationStream
from mlx_backend.types import Delta, Finished, Generate

log = logging.getLogger("mlx_gateway")


class Renderer(Protocol):
    """Chat and legacy completions differ only in the shape of what they send."""

    def opening(self, meta: ResponseMeta) -> Any | None: ...
    def text(self, meta: ResponseMeta, text: str) -> Any: ...
    def closing(self, meta: ResponseMeta, finish_reason: str) -> Any: ...
    def usage(self, meta: ResponseMeta, finished: Finished) -> Any: ...
    def whole(self, meta: ResponseMeta, text: str, finished: Finished) -> ChatCompletion | Completion: ...


async def respond(
    runtime: GatewayRuntime,
    request: Request[Any, Any, Any],
    command: Generate,
    meta: ResponseMeta,
    renderer: Renderer,
    *,
    stream: bool,
    include_usage: bool,
) -> Response[Any] | Stream:
    arrived_at = time.monotonic()
    events = runtime.run(command, arrived_at)
    try:
        await anext(events)  # Started: admitted, model loaded, prompt fits
    except BaseException:
        await events.aclose()
        raise
    if stream:
        body = _stream(events, meta, renderer, include_usage)
        return Stream(body, media_type="text/event-stream", headers=sse.HEADERS)
    return Response(await _fold_unless_client_leaves(events, meta, renderer, request))


async def _stream(
    events: GenerationStream, meta: ResponseMeta, renderer: Renderer, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        opening = renderer.opening(meta)
        if opening is not None:
            yield sse.event(opening)
        async for event in events:
            if isinstance(event, Delta) and event.text:
                yield sse.event(renderer.text(meta, event.text))
            elif isinstance(event, Finished):
                yield sse.event(renderer.closing(meta, public_finish_reason(event.finish_reason)))
                if include_usage:
                    yield sse.event(renderer.usage(meta, event))
        yield sse.DONE
    except GatewayError as exc:
        log.warning("stream ended by error: %s", exc.message)
        yield sse.event(exc.body())
        yield sse.DONE
    except Exception:
        log.exception("stream failed")
        yield sse.event(internal(meta.id).body())
        yield sse.DONE
    finally:
        await events.aclose()  # a client that left aborts its request here


async def _fold(events: GenerationStream, meta: ResponseMeta, renderer: Renderer) -> Any:
    parts: list[str] = []
    try:
        async for event in events:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return renderer.whole(meta, "".join(parts), event)
    finally:
        await events.aclose()
    raise RuntimeError("the engine ended a request without Finished")


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _fold_unless_client_leaves(
    events: GenerationStream, meta: ResponseMeta, renderer: Renderer, request: Request[Any, Any, Any]
) -> Any:
    """Non-streaming clients that hang up must free their batch slot too, not generate to max_tokens."""
    fold = asyncio.create_task(_fold(events, meta, renderer))
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({fold, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not fold.done():
            fold.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fold
        gone.cancel()
    if fold.cancelled():
        log.info("client disconnected; request aborted")
        raise GatewayError(ErrorKind.CLIENT_CLOSED, "The client closed the connection; the request was aborted.")
    return fold.result()
