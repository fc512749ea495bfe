"""What every generation route shares: run the request, then stream it or fold it into one body.

Stream and non-stream read one Exchange the same way (the non-stream path folds it). The request's start
is awaited before any byte is sent (`start`), so admission, model-load and context-length failures are
real HTTP errors; once SSE headers are out, a failure is an event in the API's own shape (chat: one
`data: {"error": ...}` event, then `data: [DONE]`).

Chat and legacy completions stream text (`respond`, a `Renderer`); the Responses and Messages APIs stream a
reply of blocks, text and tool calls (`stream_reply` with a `BlockRenderer`, `fold_reply`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway import images, sse, test_script
from gateway.errors import GatewayError, internal
from gateway.exchange import Exchange
from gateway.lifecycle import GatewayRuntime, new_request_id
from gateway.protocol import Usage
from gateway.render import FoldedChoice, Folder, ResponseMeta
from gateway.reply import Reply, Step
from mlx_backend import timeline
from mlx_backend.contract import Delta, Finished, Generate

T = TypeVar("T")

log = logging.getLogger("mlx_gateway")


class Renderer(Protocol):
    """Chat and legacy completions differ only in the shape of what they send."""

    def opening(self, meta: ResponseMeta, index: int) -> Any | None: ...
    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        """The SSE event of a Delta, ready to send; None: it carries nothing to send."""
    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> Any: ...
    def usage(self, meta: ResponseMeta, usage: Usage) -> Any: ...
    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> Any: ...


def exchange_id(request: Request[Any, Any, Any]) -> str:
    """The id a request is known by inside the server, always unique: the X-Request-Id the server made for
    it when the client sent none (so that header names the response), otherwise a fresh one, since ids
    that clients choose can repeat."""
    if "x-request-id" in request.headers:
        return new_request_id()
    return str(request.state.request_id)


async def start(runtime: GatewayRuntime, request: Request[Any, Any, Any], command: Generate) -> Exchange:
    """Admit the request and wait until it runs: every failure up to here is a plain HTTP error."""
    if runtime.settings.test_faults and runtime.settings.test_script is not None:
        command = test_script.scripted(command, runtime.settings.test_script)
    settings = runtime.settings
    command = images.resolve(command, settings.max_images, settings.max_image_bytes, settings.image_dir)
    exchange = runtime.admit(command, time.monotonic())
    exchange.watch_disconnect(request.receive)  # a client leaving while queued or loading is noticed too
    try:
        await exchange.started()  # admitted, model loaded, prompt fits
    except BaseException:
        exchange.close()
        raise
    return exchange


def streaming(exchange: Exchange, body: AsyncIterator[bytes]) -> Stream:
    if timeline.ACTIVE:
        timeline.record("Q", exchange.id, 1, int(exchange.arrived_at * 1e9))  # monotonic, as the stamps
    exchange.stop_watching()  # the streaming response watches the connection from here
    return Stream(body, media_type="text/event-stream", headers=sse.HEADERS,
                  background=BackgroundTask(_close, exchange))


async def _close(exchange: Exchange) -> None:
    exchange.close()  # async: Litestar runs a sync background task in a worker thread


async def folded(exchange: Exchange, body: Awaitable[T]) -> T:
    if timeline.ACTIVE:
        timeline.record("Q", exchange.id, 0, int(exchange.arrived_at * 1e9))
    try:
        return await body
    finally:
        exchange.close()


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
    exchange = await start(runtime, request, command)
    if stream:
        return streaming(exchange, _stream(exchange, meta, renderer, include_usage))
    return Response(await folded(exchange, _fold(exchange, meta, renderer)))


async def _stream(
    exchange: Exchange, meta: ResponseMeta, renderer: Renderer, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        for index in range(exchange.command.n):
            opening = renderer.opening(meta, index)
            if opening is not None:
                yield sse.event(opening)
        texts = 0
        tail = b""  # the last choice's closing chunk: it goes out with the usage chunk and [DONE], one write
        while not exchange.complete:
            event = await exchange.next()
            if isinstance(event, Finished):
                closing = sse.event(renderer.closing(meta, event.index, event.finish_reason))
                if exchange.complete:
                    tail = closing
                else:
                    yield closing
            elif (data := renderer.delta_event(meta, event)) is not None:
                if not timeline.ACTIVE:
                    yield data
                    continue
                handed = timeline.now()
                yield data  # Litestar sends it; we resume once its `send` has returned
                timeline.record("H", exchange.id, texts, exchange.completion_tokens, handed, timeline.now())
                texts += 1
        if include_usage:
            tail += sse.event(renderer.usage(meta, exchange.usage()))
        yield tail + sse.DONE
    except GatewayError as exc:
        log.warning("stream ended by error: %s", exc.message)
        yield sse.event(exc.body()) + sse.DONE
    except Exception:
        log.exception("stream failed")
        yield sse.event(internal(meta.id).body()) + sse.DONE
    finally:
        exchange.close()  # a client that left ends its request here (or in the response's background task)


async def _fold(exchange: Exchange, meta: ResponseMeta, renderer: Renderer) -> Any:
    folder = Folder()
    for index in range(exchange.command.n):
        folder.choice(index)
    while not exchange.complete:
        event = await exchange.next()
        if isinstance(event, Finished):
            folder.choice(event.index).finish_reason = event.finish_reason
        else:
            folder.add(event)
    if timeline.ACTIVE:
        timeline.record("D", exchange.id, timeline.now())
    return renderer.whole(meta, folder.ordered(), exchange.usage())


# -- replies of blocks (Responses API, Messages API) -----------------------------------------------------


class BlockRenderer(Protocol):
    """What one API sends for a reply's life; each method returns SSE frames, ready to send. `closing` ends
    the reply (`reply.finish()`, whose steps it renders knowing how the reply ended)."""

    def opening(self) -> list[bytes]: ...
    def step(self, step: Step) -> list[bytes]: ...
    def closing(self, reply: Reply, finished: Finished) -> list[bytes]: ...
    def failure(self, reply: Reply, error: GatewayError) -> list[bytes]: ...


async def stream_reply(exchange: Exchange, renderer: BlockRenderer) -> AsyncIterator[bytes]:
    reply = Reply()
    try:
        for frame in renderer.opening():
            yield frame
        while True:
            event = await exchange.next()
            if isinstance(event, Finished):
                for frame in renderer.closing(reply, event):
                    yield frame
                return
            for frame in [f for s in reply.add(event) for f in renderer.step(s)]:
                yield frame
    except GatewayError as exc:
        log.warning("stream ended by error: %s", exc.message)
        for frame in renderer.failure(reply, exc):
            yield frame
    except Exception:
        log.exception("stream failed")
        for frame in renderer.failure(reply, internal(exchange.id)):
            yield frame
    finally:
        exchange.close()  # a client that left ends its request here (or in the response's background task)


async def fold_reply(exchange: Exchange) -> tuple[Reply, Finished]:
    """The whole reply, for a non-streaming answer."""
    reply = Reply()
    while True:
        event = await exchange.next()
        if isinstance(event, Finished):
            reply.finish()
            return reply, event
        reply.add(event)
