"""POST /v1/chat/completions"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway import convert
from gateway.convert import ResponseMeta
from gateway.lifecycle import GatewayRuntime
from gateway.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkDelta
from gateway.routes import responses
from gateway.routes.generation import exchange_id, respond
from mlx_backend.types import Finished


class ChatRenderer:
    def opening(self, meta: ResponseMeta) -> ChatCompletionChunk:
        return convert.chat_chunk(meta, ChunkDelta(role="assistant", content=""))

    def text(self, meta: ResponseMeta, text: str) -> ChatCompletionChunk:
        return convert.chat_chunk(meta, ChunkDelta(content=text))

    def closing(self, meta: ResponseMeta, finish_reason: str) -> ChatCompletionChunk:
        return convert.chat_chunk(meta, ChunkDelta(), finish_reason)

    def usage(self, meta: ResponseMeta, finished: Finished) -> ChatCompletionChunk:
        return convert.chat_usage_chunk(meta, finished)

    def whole(self, meta: ResponseMeta, text: str, finished: Finished) -> ChatCompletion:
        return convert.chat_completion(meta, text, finished)


@post(
    "/v1/chat/completions",
    status_code=200,
    operation_id="createChatCompletion",
    summary="Create a chat completion",
    description="OpenAI-compatible chat completion; `stream: true` answers with server-sent events.",
    tags=["OpenAI"],
    responses={**responses.GENERATION, 200: responses.ok(ChatCompletion, ChatCompletionChunk)},
)
async def create_chat_completion(
    request: Request[Any, Any, Any], data: ChatCompletionRequest
) -> Response[ChatCompletion] | Stream:
    runtime: GatewayRuntime = request.app.state.runtime
    request_id = exchange_id(request)
    runtime.resolve(data.model)  # 404 for an unknown model before judging its parameters
    command = convert.chat_to_generate(
        data, request_id, runtime.settings.max_tokens_default, runtime.settings.test_faults
    )
    meta = ResponseMeta(f"chatcmpl-{request_id}", data.model)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return await respond(runtime, request, command, meta, ChatRenderer(), stream=bool(data.stream),
                         include_usage=include_usage)
