"""POST /v1/chat/completions and POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway import openapi_errors
from gateway.chat.adapter import chat_adapter, completion_adapter
from gateway.chat.wire import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest
from gateway.serving.generation import serve


@post(
    "/v1/chat/completions",
    status_code=200,
    operation_id="createChatCompletion",
    summary="Create a chat completion",
    description="OpenAI-compatible chat completion; `stream: true` answers with server-sent events.",
    tags=["OpenAI"],
    responses={**openapi_errors.GENERATION, 200: openapi_errors.ok(ChatCompletion, ChatCompletionChunk)},
)
async def create_chat_completion(
    request: Request[Any, Any, Any], data: ChatCompletionRequest
) -> Response[ChatCompletion] | Stream:
    return await serve(request, data.model, bool(data.stream),
                       lambda runtime, request_id: chat_adapter(data, runtime.settings, request_id))


@post(
    "/v1/completions",
    status_code=200,
    operation_id="createCompletion",
    summary="Create a text completion (legacy)",
    description="OpenAI-compatible legacy completion; `stream: true` answers with server-sent events.",
    tags=["OpenAI"],
    responses={**openapi_errors.GENERATION, 200: openapi_errors.ok(Completion, Completion)},
)
async def create_completion(request: Request[Any, Any, Any], data: CompletionRequest) -> Response[Completion] | Stream:
    return await serve(request, data.model, bool(data.stream),
                       lambda runtime, request_id: completion_adapter(data, runtime.settings, request_id))
