"""Litestar's exceptions turned into our errors (one table, gateway/errors.py), rendered in each API's shape.

`exception_handlers(render)` is the handler map: the app uses OpenAI's shape; the Anthropic routes pass
their own renderer in their decorators, so their validation errors, 401s, 413s and 500s come out in
Anthropic's shape. Guards and body decoding run inside the route, so route-level handlers see them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from gateway.errors import ErrorKind, GatewayError, internal
from gateway.logs import request_id_var

log = logging.getLogger("mlx_gateway")

Render = Callable[[GatewayError], Response[Any]]

_STATUS_KINDS = {
    400: ErrorKind.INVALID_REQUEST, 401: ErrorKind.UNAUTHORIZED, 404: ErrorKind.ROUTE_NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED, 413: ErrorKind.BODY_TOO_LARGE, 415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorKind.OVERLOADED, 503: ErrorKind.NOT_READY,
}


def openai_response(error: GatewayError) -> Response[Any]:
    return Response(error.body(), status_code=error.status, headers=error.headers())


def anthropic_response(error: GatewayError) -> Response[Any]:
    headers = error.headers()
    if error.kind is ErrorKind.UNAUTHORIZED:
        headers.pop("WWW-Authenticate", None)  # Anthropic's scheme is the x-api-key header, not Bearer
    return Response(error.anthropic_body(request_id_var.get()), status_code=error.status, headers=headers)


def from_validation(exc: ValidationException) -> GatewayError:
    """Litestar's msgspec validation errors, as our error naming the field."""
    details = exc.extra if isinstance(exc.extra, list) else []
    first = details[0] if details and isinstance(details[0], dict) else {}
    message = str(first.get("message") or exc.detail)
    param = str(first["key"]) if first.get("key") and first.get("key") != "data" else None  # data: the body
    if "malformed" in message.lower():
        return GatewayError(ErrorKind.INVALID_JSON, f"The body is not valid JSON: {message}")
    if "unknown field" in message:
        field = re.search(r"`([^`]*)`", message)
        name = field.group(1) if field else param
        if name and param and name != param:  # nested: name the full path
            name = f"{param}.{name}"
        return GatewayError(ErrorKind.UNSUPPORTED_PARAMETER, f"Unrecognized request argument supplied: {name}", name)
    where = f" for '{param}'" if param else ""
    return GatewayError(ErrorKind.INVALID_REQUEST, f"Invalid value{where}: {message}", param)


def from_http_exception(exc: HTTPException) -> GatewayError | None:
    """Litestar's HTTP errors (404, 405, 413...) as ours; None for a 5xx we did not raise (a bug)."""
    kind = _STATUS_KINDS.get(exc.status_code, ErrorKind.INVALID_REQUEST if exc.status_code < 500 else None)
    if kind is None:
        return None
    if exc.status_code == 400 and "malformed" in exc.detail.lower():
        kind = ErrorKind.INVALID_JSON
    return GatewayError(kind, exc.detail)


def _logged(render: Render) -> Callable[[Request[Any, Any, Any], GatewayError], Response[Any]]:
    """`render`, and a log line naming the route, the status and the message: an operator (or a test driving
    a real client) sees what a client was refused for, not only that it was."""

    def render_and_log(request: Request[Any, Any, Any], error: GatewayError) -> Response[Any]:
        # The scope's path: request.url would parse the Host header, which may be what the error is about.
        log.info("%s %s -> %d %s", request.method, request.scope["path"], error.status, error.message)
        return render(error)

    return render_and_log


def exception_handlers(render: Render) -> ExceptionHandlersMap:
    respond = _logged(render)

    def on_gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
        return respond(request, exc)

    def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
        return respond(request, from_validation(exc))

    def on_undecodable_body(request: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Any]:
        return respond(request, GatewayError(ErrorKind.INVALID_JSON, f"The body is not valid UTF-8 JSON: "
                                                                     f"{exc.reason} at byte {exc.start}."))

    def on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        error = from_http_exception(exc)
        if error is None:
            return on_unexpected(request, exc)
        response = respond(request, error)
        response.headers.update(exc.headers or {})  # e.g. Allow on 405
        return response

    def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        request_id = request_id_var.get() or "unknown"
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return render(internal(request_id))

    return {
        GatewayError: on_gateway_error,
        ValidationException: on_validation_error,
        UnicodeDecodeError: on_undecodable_body,  # Litestar's JSON decoding raises it raw
        HTTPException: on_http_exception,
        Exception: on_unexpected,
    }
