"""The one serving path every generation route goes through (`serve`), with a small adapter per API.

A route hands `serve` its model, whether it streams, and a way to build its `Adapter` (the API's request
converted to the engine's `Generate`, refusals by name); `serve` owns the rest: the 404 for an unknown model,
admission into an `Exchange` (gateway/serving/exchange.py), the wait until the request runs, and then a
stream or one body. The request's start is awaited before any byte is sent, so admission, model-load and
context-length failures are real HTTP errors (in the API's own terms: `Adapter.engine_fields`); once SSE
headers are out, a failure is an event in the API's own shape (chat: one `data: {"error": ...}` event, then
`data: [DONE]`).

Replies come in two shapes. Chat and legacy completions send text per choice, n choices at once
(gateway/chat/adapter.py); the Responses and Messages APIs send one reply of blocks, text and tool calls
(`stream_reply` with a `BlockRenderer`, `fold_reply`, here). Stream and non-stream read one Exchange the
same way (the non-stream path folds it).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway import test_script
from gateway.errors import GatewayError, internal
from gateway.runtime import GatewayRuntime
from gateway.serving import images, sse
from gateway.serving.convert import in_api_terms
from gateway.serving.exchange import Exchange
from gateway.serving.reply import Reply, Step
from mlx_backend import timeline
from mlx_backend.contract import Finished, Generate

T = TypeVar("T")

log = logging.getLogger("mlx_gateway")


def new_request_id() -> str:
    """Server-made and unique: a client's X-Request-Id is kept for logs, never used as a key."""
    return uuid.uuid4().hex


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
    exchange = runtime.admission.admit(command, time.monotonic())
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
    except GatewayError:
        raise  # the engine's or the client's doing: the exchange already ended with its reason
    except Exception:
        exchange.fail(internal(exchange.id))  # a bug folding it; the app's handler answers the 500
        raise
    finally:
        exchange.close()


class Adapter(Protocol):
    """What one API adds to the serving path: its engine command, the names its engine errors are told in
    (chat's field patterns -> the API's, for `in_api_terms`), and its reply, streamed or whole."""

    command: Generate
    engine_fields: Mapping[str, str]

    def stream(self, exchange: Exchange) -> AsyncIterator[bytes]:
        """The SSE frames of the reply, ready to send."""

    async def whole(self, exchange: Exchange) -> Any:
        """The response body, once the reply is complete."""


async def serve(
    request: Request[Any, Any, Any], model: str, stream: bool, adapt: Callable[[GatewayRuntime, str], Adapter]
) -> Response[Any] | Stream:
    """Serve one generation request: `adapt(runtime, request_id)` converts it (refusals by name, after the
    404 for an unknown model), then it runs, streamed or folded into one body."""
    runtime: GatewayRuntime = request.app.state.runtime
    request_id = exchange_id(request)
    runtime.catalog.resolve(model)  # 404 for an unknown model before judging its parameters
    adapter = adapt(runtime, request_id)
    try:
        exchange = await start(runtime, request, adapter.command)
    except GatewayError as exc:
        told = in_api_terms(exc, adapter.engine_fields)
        if told is exc:
            raise
        raise told from exc
    if stream:
        return streaming(exchange, adapter.stream(exchange))
    return Response(await folded(exchange, adapter.whole(exchange)))


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
        error = internal(exchange.id)
        exchange.fail(error)
        for frame in renderer.failure(reply, error):
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
