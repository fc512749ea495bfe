"""The error responses each route documents in OpenAPI, all with OpenAI's error body."""

from __future__ import annotations

from typing import Any

from litestar.openapi import ResponseSpec

from gateway.protocol import ErrorResponse


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(ErrorResponse, description=description, generate_examples=False)


COMMON = {
    401: _error("Missing or invalid API key (when one is configured)"),
    500: _error("Internal error; the message carries the request id"),
}
MODEL_LOOKUP = {**COMMON, 404: _error("No such model (code model_not_found)")}
GENERATION = {
    **MODEL_LOOKUP,
    400: _error("Invalid or unsupported parameter, or a prompt longer than the context"),
    413: _error("Request body too large"),
    415: _error("The body is not sent as Content-Type: application/json"),
    429: _error("At capacity: retry after Retry-After seconds"),
    503: _error("Engine unavailable, or the server is draining: retry after Retry-After seconds"),
    504: _error("The request ran past the request timeout"),
}
ADMIN = {
    **MODEL_LOOKUP,
    400: _error("Invalid body"),
    409: _error("Unload of a model that is serving requests or loading (code model_busy)"),
    415: _error("The body is not sent as Content-Type: application/json"),
    429: _error("Its weights do not fit while the memory stays held (pinned models): retry after Retry-After"),
    503: _error("Engine unavailable, or the server is draining: retry after Retry-After seconds"),
    504: _error("The load took longer than load_timeout_s (it may still finish)"),
}


def ok(body: type[Any], chunk: type[Any]) -> ResponseSpec:
    name = chunk.__name__
    return ResponseSpec(
        body, generate_examples=False,
        description=f"The whole response as JSON; with `stream: true`, `text/event-stream` of `data: <{name}>` "
        "events ending with `data: [DONE]`",
    )
