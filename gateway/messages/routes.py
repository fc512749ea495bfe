"""POST /v1/messages and POST /v1/messages/count_tokens (Anthropic's Messages API)

Every error of these routes, validation and authentication included, is in Anthropic's shape: the route
handlers carry their own exception handlers (gateway/error_handlers.py).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from gateway import error_handlers, openapi_errors
from gateway.errors import GatewayError
from gateway.messages import convert
from gateway.messages.adapter import MessageAdapter
from gateway.messages.wire import CountTokensRequest, CountTokensResponse, Message, MessageCreateRequest
from gateway.runtime import GatewayRuntime
from gateway.serving import images
from gateway.serving.convert import in_api_terms
from gateway.serving.generation import exchange_id, serve

_ANTHROPIC_ERRORS = error_handlers.exception_handlers(error_handlers.anthropic_response)
_OK = ResponseSpec(
    Message, generate_examples=False,
    description="The message; with `stream: true`, `text/event-stream` of `event: <type>` + `data: <event>` "
                "pairs (message_start, ping, content_block_start/delta/stop, message_delta, message_stop)",
)


@post(
    "/v1/messages",
    status_code=200,
    operation_id="createMessage",
    summary="Create a message (Anthropic Messages API)",
    description="Anthropic's Messages API: text, client tools (tool_use / tool_result), streaming events; "
                "errors in Anthropic's shape. `x-api-key` is accepted as the API key.",
    tags=["Anthropic"],
    responses={**openapi_errors.ANTHROPIC_GENERATION, 200: _OK},
    exception_handlers=_ANTHROPIC_ERRORS,
)
async def create_message(request: Request[Any, Any, Any], data: MessageCreateRequest) -> Response[Message] | Stream:
    return await serve(request, data.model, bool(data.stream),
                       lambda runtime, request_id: MessageAdapter(data, runtime.settings, request_id))


@post(
    "/v1/messages/count_tokens",
    status_code=200,
    operation_id="countMessageTokens",
    summary="Count the input tokens of a message request",
    description="The prompt tokens the same request to /v1/messages would run with (its model's chat template, "
                "tools included), counted by the engine without generating; loads the model if needed.",
    tags=["Anthropic"],
    responses={**openapi_errors.ANTHROPIC_GENERATION, 200: ResponseSpec(CountTokensResponse, generate_examples=False)},
    exception_handlers=_ANTHROPIC_ERRORS,
)
async def count_message_tokens(request: Request[Any, Any, Any], data: CountTokensRequest) -> CountTokensResponse:
    runtime: GatewayRuntime = request.app.state.runtime
    runtime.catalog.resolve(data.model)
    command = convert.to_generate(data, exchange_id(request))
    settings = runtime.settings
    command = images.resolve(command, settings.max_images, settings.max_image_bytes, settings.image_dir)
    try:
        return CountTokensResponse(await runtime.admission.count_prompt(command))
    except GatewayError as exc:
        raise in_api_terms(exc, convert.ENGINE_FIELDS) from exc
