"""POST /v1/responses, GET and DELETE /v1/responses/{response_id} (OpenAI's Responses API)"""

from __future__ import annotations

import logging
from typing import Any

from litestar import HttpMethod, Request, Response, delete, get, post, route
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from gateway import openapi_errors
from gateway.errors import ErrorKind, GatewayError
from gateway.lifecycle import GatewayRuntime
from gateway.responses import convert
from gateway.responses.wire import DeletedResponse, ResponseCreateRequest, ResponseObject
from gateway.serving.convert import in_api_terms
from gateway.serving.generation import exchange_id, fold_reply, folded, start, stream_reply, streaming
from gateway.serving.reply import Reply

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
    runtime: GatewayRuntime = request.app.state.runtime
    request_id = exchange_id(request)
    runtime.resolve(data.model)  # 404 for an unknown model before judging its parameters
    store = runtime.responses
    history: tuple[Any, ...] = ()
    if data.previous_response_id is not None:
        found = store.conversation(data.previous_response_id)
        if found is None:
            raise GatewayError(
                ErrorKind.PREVIOUS_RESPONSE_NOT_FOUND,
                f"Previous response with id '{data.previous_response_id}' not found. Responses are kept in this "
                "server's memory only (bounded by --responses-store-mb, least recently used forgotten first, "
                "lost on restart); send the whole conversation as input instead.",
                "previous_response_id",
            )
        history = found
    new_input = convert.input_messages(data.input)
    command = convert.to_generate(data, request_id, history, new_input,
                                            runtime.settings.max_tokens_default, runtime.settings.test_faults)
    keep = data.store is not False and store.enabled
    base = convert.new_response(data, request_id, keep)

    def done(response: ResponseObject, reply: Reply) -> None:
        if keep and not store.put(response, (*new_input, convert.turn_of(reply))):
            log.warning("response %s is larger than the whole response store; not kept", response.id)

    try:
        exchange = await start(runtime, request, command)
    except GatewayError as exc:
        raise in_api_terms(exc, convert.ENGINE_FIELDS) from exc
    if data.stream:
        return streaming(exchange, stream_reply(exchange, convert.ResponseStream(base, done)))
    reply, finished = await folded(exchange, fold_reply(exchange))
    response = convert.finished_response(base, reply, finished)
    done(response, reply)
    return Response(response)


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
