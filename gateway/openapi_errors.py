"""The error responses each route documents in OpenAPI: OpenAI's error body, or Anthropic's on its routes."""

from __future__ import annotations

from typing import Any

from litestar.openapi import ResponseSpec

from gateway.chat.wire import ErrorResponse
from gateway.messages.wire import AnthropicErrorResponse


def error(description: str, body: type[Any] = ErrorResponse) -> ResponseSpec:
    return ResponseSpec(body, description=description, generate_examples=False)


def _generation(body: type[Any]) -> dict[int, ResponseSpec]:
    return {
        401: error("Missing or invalid API key (when one is configured)", body),
        500: error("Internal error; the message carries the request id", body),
        404: error("No such model (code model_not_found)", body),
        400: error("Invalid or unsupported parameter, or a prompt longer than the context", body),
        408: error("The body stopped arriving for longer than the body timeout; the connection is closed", body),
        413: error("Request body too large", body),
        415: error("The body is not sent as Content-Type: application/json", body),
        429: error("At capacity: retry after Retry-After seconds", body),
        503: error("Engine unavailable, or the server is draining: retry after Retry-After seconds", body),
        504: error("The request ran past the request timeout", body),
    }


COMMON = {
    401: error("Missing or invalid API key (when one is configured)"),
    500: error("Internal error; the message carries the request id"),
}
MODEL_LOOKUP = {**COMMON, 404: error("No such model (code model_not_found)")}
GENERATION = _generation(ErrorResponse)
ANTHROPIC_GENERATION = _generation(AnthropicErrorResponse)  # the same statuses, in Anthropic's error shape
ADMIN = {
    **MODEL_LOOKUP,
    400: error("Invalid body"),
    409: error("Unload of a model that is serving requests or loading (code model_busy)"),
    415: error("The body is not sent as Content-Type: application/json"),
    429: error("Its weights do not fit while the memory stays held (pinned models): retry after Retry-After"),
    503: error("Engine unavailable, or the server is draining: retry after Retry-After seconds"),
    504: error("The load took longer than load_timeout_s (it may still finish)"),
}


def ok(body: type[Any], chunk: type[Any]) -> ResponseSpec:
    name = chunk.__name__
    return ResponseSpec(
        body, generate_examples=False,
        description=f"The whole response as JSON; with `stream: true`, `text/event-stream` of `data: <{name}>` "
        "events ending with `data: [DONE]`",
    )
