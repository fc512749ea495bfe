"""The ASGI app: `create_app` (routes, exception handlers, lifespan), the middleware around every request
(request id and access metrics, the body timeout, HEAD on GET routes), and `/openapi.json`. The routes live
in each API's folder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, cast

from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig

from gateway import error_handlers, metrics, openapi, security
from gateway.admin import routes as admin_routes
from gateway.admin.routes import list_models, retrieve_model
from gateway.chat.routes import create_chat_completion, create_completion
from gateway.errors import ErrorKind, GatewayError
from gateway.health.routes import health, liveness, prometheus_metrics, readiness, status
from gateway.logs import request_id_var
from gateway.messages.routes import count_message_tokens, create_message
from gateway.responses.routes import (
    create_response,
    delete_response,
    retrieve_response,
    stored_response_options,
)
from gateway.runtime import GatewayRuntime
from gateway.strict_body import StrictBody
from mlx_backend import __version__

log = logging.getLogger("mlx_gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@get("/openapi.json", include_in_schema=False, media_type="application/json", opt=security.DOCS)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(openapi.render(request.app), media_type="application/json")


# Plain ASGI types: this middleware sits outside Litestar and handles raw scopes and messages.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestContextMiddleware:
    """Request id (header, logs, error bodies) and HTTP metrics, for every request.

    It wraps the whole Litestar app (not Litestar's per-route middleware) so unmatched routes get it too.
    Authentication is not here: it is a guard on the routed request (gateway/security.py).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.monotonic()

        def send_with_id(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's awaitable: no coroutine of ours per body chunk.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("path_template") or "unmatched"
            metrics.HTTP_REQUESTS.labels(route, security.method_label(scope["method"]), str(status)).inc()
            if status >= 500 and not scope["path"].startswith("/health"):
                log.warning("%s %s -> %d in %.3fs", scope["method"], scope["path"], status,
                            time.monotonic() - started)
            request_id_var.reset(token)


class BodyTimeoutMiddleware:
    """A client that pauses longer than `timeout_s` while sending its body gets 408 and loses the connection.

    Granian times the headers only: a client gone quiet halfway through its body (a laptop closed on Wi-Fi,
    a stalled proxy) would otherwise hold its connection and handler forever, since a server that only reads
    never learns that its peer vanished. The pause between two body messages is timed, not the whole body
    (as nginx's client_body_timeout), so a slow but steady upload passes. Once the body is in, `receive` only
    waits for a disconnect, untimed.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                # Raised where Litestar reads the body, so its exception handlers answer (408, our shape).
                raise GatewayError(ErrorKind.BODY_TIMEOUT, f"The request body stopped arriving: nothing came for "
                                   f"{self.timeout_s:g}s. Send the whole body without pausing.") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)


class HeadMiddleware:
    """`HEAD` on every `GET` route (RFC 9110 9.3.2): the request runs as a GET, and the answer goes out with
    the GET's status and headers (its Content-Length too) but no body. Monitors and proxies probe with
    HEAD; Litestar answers it only on routes that declare it. A path without GET still answers 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def create_app(runtime: GatewayRuntime) -> Litestar:
    settings = runtime.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        # Never load a model here: a startup exception would exit the whole server.
        await runtime.engine.start()
        try:
            yield
        finally:
            log.info("shutdown: stopping the engine and clearing the model cache")
            await runtime.engine.stop()

    app = Litestar(
        route_handlers=[create_chat_completion, create_completion, create_response, stored_response_options,
                        retrieve_response, delete_response, create_message, count_message_tokens, list_models,
                        retrieve_model, health, liveness, readiness, prometheus_metrics, openapi_json, status,
                        *admin_routes.ROUTES],
        lifespan=[lifespan],
        exception_handlers=error_handlers.exception_handlers(error_handlers.openai_response),
        guards=security.guards(settings),
        dto=StrictBody,  # every body decoded strictly: a wrong JSON type is a 400 naming the field
        return_dto=None,
        # Litestar's CORS middleware sits outside the router and its exception handling: it answers
        # preflights before any guard, and adds its headers to every error (401 too).
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="mlx-gateway", version=__version__,
            description="OpenAI-compatible (chat completions, Responses) and Anthropic-compatible (Messages) "
                        "APIs for local MLX models.",
            openapi_router=Router("/docs", route_handlers=[], include_in_schema=False, opt=security.DOCS),
        ),
        logging_config=None,
        debug=False,
    )
    app.state.runtime = runtime
    return app


def create_asgi_app(runtime: GatewayRuntime) -> ASGIApp:
    """What Granian serves: the Litestar app (answering HEAD as GET) inside the body timeout, inside the
    request-context middleware (so a 408 carries a request id and is counted)."""
    app = BodyTimeoutMiddleware(HeadMiddleware(cast(ASGIApp, create_app(runtime))), runtime.settings.body_timeout_s)
    return RequestContextMiddleware(app)
