"""What chat and legacy completions share: run the request, then stream it or fold it into one body.

Stream and non-stream read one Exchange the same way (the non-stream path folds it). The request's start
is awaited before any byte is sent, so admission, model-load and context-length failures are real HTTP
errors; once SSE headers are out, a failure is one `data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway import sse
from gateway.convert import ResponseMeta, public_finish_reason
from gateway.errors import GatewayError, internal
from gateway.exchange import Exchange
from gateway.lifecycle import GatewayRuntime, new_request_id
from gateway.protocol import ChatCompletion, Completion
from mlx_backend import timeline
from mlx_backend.types import Finished, Generate

log = logging.getLogger("mlx_gateway")


class Renderer(Protocol):
    """Chat and legacy completions differ only in the shape of what they send."""

    def opening(self, meta: ResponseMeta) -> Any | None: ...
    def text(self, meta: ResponseMeta, text: str) -> Any: ...
    def closing(self, meta: ResponseMeta, finish_reason: str) -> Any: ...
    def usage(self, meta: ResponseMeta, finished: Finished) -> Any: ...
    def whole(self, meta: ResponseMeta, text: str, finished: Finished) -> ChatCompletion | Completion: ...


def exchange_id(request: Request[Any, Any, Any]) -> str:
    """The id a request is known by inside the server, always unique: the X-Request-Id the server made for
    it when the client sent none (so that header names the response), otherwise a fresh one, since ids
    that clients choose can repeat."""
    if "x-request-id" in request.headers:
        return new_request_id()
    return str(request.state.request_id)


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
    exchange = runtime.admit(command, time.monotonic())
    if timeline.ACTIVE:
        timeline.record("Q", exchange.id, int(stream), timeline.now())
    exchange.watch_disconnect(request.receive)  # a client leaving while queued or loading is noticed too
    try:
        await exchange.started()  # admitted, model loaded, prompt fits
    except BaseException:
        exchange.close()
        raise
    if stream:
        exchange.stop_watching()  # the streaming response watches the connection from here
        body = _stream(exchange, meta, renderer, include_usage)
        return Stream(body, media_type="text/event-stream", headers=sse.HEADERS,
                      background=BackgroundTask(exchange.close))
    try:
        return Response(await _fold(exchange, meta, renderer))
    finally:
        exchange.close()


async def _stream(
    exchange: Exchange, meta: ResponseMeta, renderer: Renderer, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        opening = renderer.opening(meta)
        if opening is not None:
            yield sse.event(opening)
        texts = 0
        while True:
            event = await exchange.next()
            if isinstance(event, Finished):
                yield sse.event(renderer.closing(meta, public_finish_reason(event.finish_reason)))
                if include_usage:
                    yield sse.event(renderer.usage(meta, event))
                break
            if event.text:
                chunk = sse.event(renderer.text(meta, event.text))
                if not timeline.ACTIVE:
                    yield chunk
                    continue
                handed = timeline.now()
                yield chunk  # Litestar sends it; we resume once its `send` has returned
                timeline.record("H", exchange.id, texts, exchange.completion_tokens, handed, timeline.now())
                texts += 1
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
        exchange.close()  # a client that left ends its request here (or in the response's background task)


async def _fold(exchange: Exchange, meta: ResponseMeta, renderer: Renderer) -> Any:
    parts: list[str] = []
    while True:
        event = await exchange.next()
        if isinstance(event, Finished):
            if timeline.ACTIVE:
                timeline.record("D", exchange.id, timeline.now())
            return renderer.whole(meta, "".join(parts), event)
        parts.append(event.text)
