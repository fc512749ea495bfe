"""POST /v1/responses, GET and DELETE /v1/responses/{response_id} (OpenAI's Responses API)"""

from __future__ import annotations

import logging
from typing import Any

from litestar import HttpMethod, Request, Response, delete, get, post, route
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from gateway import openapi_errors
from gateway.errors import ErrorKind, GatewayError
from gateway.responses.adapter import ResponseAdapter
from gateway.responses.wire import DeletedResponse, ResponseCreateRequest, ResponseObject
from gateway.runtime import GatewayRuntime
from gateway.serving.generation import serve

log = logging.getLogger("mlx_gateway")

_OK = ResponseSpec(
    ResponseObject, generate_examples=False,
    description="The response object; with `stream: true`, `text/event-stream` of `event: <type>` + "
                "`data: <event>` pairs (response.created ... response.completed), without `[DONE]`",
)


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(
        ErrorKind.RESPONSE_NOT_FOUND,
        f"No stored response with id '{response_id}'. Responses are kept in this server's memory (least recently "
        "used forgotten first, all lost on restart), and only when created with store not false.",
        "response_id",
    )


@post(
    "/v1/responses",
    status_code=200,
    operation_id="createResponse",
    summary="Create a model response (Responses API)",
    description="OpenAI's Responses API: text and function tools, structured output, typed streaming events, "
                "`previous_response_id` over responses kept in memory.",
    tags=["OpenAI"],
    responses={**openapi_errors.GENERATION, 200: _OK},
)
async def create_response(
    request: Request[Any, Any, Any], data: ResponseCreateRequest
) -> Response[ResponseObject] | Stream:
    def adapt(runtime: GatewayRuntime, request_id: str) -> ResponseAdapter:
        return ResponseAdapter(data, runtime.settings, runtime.responses, request_id)

    return await serve(request, data.model, bool(data.stream), adapt)


_STORED = "/v1/responses/{response_id:str}"
_NOT_FOUND = openapi_errors.error("No stored response with that id (code response_not_found)")


@route(_STORED, http_method=[HttpMethod.OPTIONS], include_in_schema=False)
async def stored_response_options() -> Response[None]:
    """Registered before GET and DELETE. Litestar makes a path's OPTIONS answer when its first handler is
    registered and never updates its Allow header, which would then name GET alone."""
    return Response(None, status_code=204, headers={"Allow": "DELETE, GET, HEAD, OPTIONS"})


@get(
    _STORED,
    operation_id="getResponse",
    summary="Retrieve a stored response",
    tags=["OpenAI"],
    responses={**openapi_errors.COMMON, 404: _NOT_FOUND},
)
async def retrieve_response(request: Request[Any, Any, Any], response_id: str) -> ResponseObject:
    runtime: GatewayRuntime = request.app.state.runtime
    stored = runtime.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@delete(
    _STORED,
    status_code=200,
    operation_id="deleteResponse",
    summary="Delete a stored response",
    tags=["OpenAI"],
    responses={**openapi_errors.COMMON, 404: _NOT_FOUND},
)
async def delete_response(request: Request[Any, Any, Any], response_id: str) -> DeletedResponse:
    runtime: GatewayRuntime = request.app.state.runtime
    if not runtime.responses.delete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(response_id)
