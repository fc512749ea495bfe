"""`create_app`: routes, exception handlers, middleware and lifespan. Nothing else lives here."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, cast

from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig

from gateway import metrics, openapi, security
from gateway.errors import ErrorKind, GatewayError, internal
from gateway.lifecycle import GatewayRuntime
from gateway.logs import request_id_var
from gateway.routes import admin
from gateway.routes.chat import create_chat_completion
from gateway.routes.completions import create_completion
from gateway.routes.health import health, liveness, prometheus_metrics, readiness
from gateway.routes.models import list_models, retrieve_model
from gateway.routes.status import status
from mlx_backend import __version__

log = logging.getLogger("mlx_gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_KINDS = {
    400: ErrorKind.INVALID_REQUEST, 401: ErrorKind.UNAUTHORIZED, 404: ErrorKind.ROUTE_NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED, 413: ErrorKind.BODY_TOO_LARGE, 415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorKind.OVERLOADED, 503: ErrorKind.NOT_READY,
}


@get("/openapi.json", include_in_schema=False, media_type="application/json", opt=security.DOCS)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(openapi.render(request.app), media_type="application/json")


def _error_response(error: GatewayError) -> Response[Any]:
    return Response(error.body(), status_code=error.status, headers=error.headers())


def _on_gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
    return _error_response(exc)


def _on_validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's msgspec validation errors, reshaped into OpenAI's error naming the field."""
    details = exc.extra if isinstance(exc.extra, list) else []
    first = details[0] if details and isinstance(details[0], dict) else {}
    message = str(first.get("message") or exc.detail)
    param = str(first["key"]) if first.get("key") and first.get("key") != "data" else None  # data: the body
    if "malformed" in message.lower():
        return _error_response(GatewayError(ErrorKind.INVALID_JSON, f"The body is not valid JSON: {message}"))
    if "unknown field" in message:
        field = re.search(r"`([^`]*)`", message)
        name = field.group(1) if field else param
        if name and param and name != param:  # nested: name the full path
            name = f"{param}.{name}"
        return _error_response(GatewayError(
            ErrorKind.UNSUPPORTED_PARAMETER, f"Unrecognized request argument supplied: {name}", name
        ))
    where = f" for '{param}'" if param else ""
    return _error_response(GatewayError(ErrorKind.INVALID_REQUEST, f"Invalid value{where}: {message}", param))


def _on_undecodable_body(_: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Any]:
    return _error_response(GatewayError(ErrorKind.INVALID_JSON, f"The body is not valid UTF-8 JSON: {exc.reason} "
                                                                f"at byte {exc.start}."))


def _on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    kind = _STATUS_KINDS.get(exc.status_code, ErrorKind.INVALID_REQUEST if exc.status_code < 500 else None)
    if kind is None:
        return _on_unexpected(_, exc)
    if exc.status_code == 400 and "malformed" in exc.detail.lower():
        kind = ErrorKind.INVALID_JSON
    response = _error_response(GatewayError(kind, exc.detail))
    response.headers.update(exc.headers or {})  # e.g. Allow on 405
    return response


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    request_id = request_id_var.get() or "unknown"
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(internal(request_id))


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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("path_template") or "unmatched"
            metrics.HTTP_REQUESTS.labels(route, security.method_label(scope["method"]), str(status)).inc()
            if status >= 500 and not scope["path"].startswith("/health"):
                log.warning("%s %s -> %d in %.3fs", scope["method"], scope["path"], status,
                            time.monotonic() - started)
            request_id_var.reset(token)


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
        route_handlers=[create_chat_completion, create_completion, list_models, retrieve_model,
                        health, liveness, readiness, prometheus_metrics, openapi_json, status, *admin.ROUTES],
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: _on_gateway_error,
            ValidationException: _on_validation_error,
            UnicodeDecodeError: _on_undecodable_body,  # Litestar's JSON decoding raises it raw
            HTTPException: _on_http_exception,
            Exception: _on_unexpected,
        },
        guards=security.guards(settings),
        # Litestar's CORS middleware sits outside the router and its exception handling: it answers
        # preflights before any guard, and adds its headers to every error (401 too).
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="mlx-gateway", version=__version__,
            description="An OpenAI-compatible API for local MLX models.",
            openapi_router=Router("/docs", route_handlers=[], include_in_schema=False, opt=security.DOCS),
        ),
        logging_config=None,
        debug=False,
    )
    app.state.runtime = runtime
    return app


def create_asgi_app(runtime: GatewayRuntime) -> ASGIApp:
    """What Granian serves: the Litestar app inside the request-context middleware."""
    return RequestContextMiddleware(cast(ASGIApp, create_app(runtime)))
