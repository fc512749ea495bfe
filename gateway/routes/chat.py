"""POST /v1/chat/completions"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway import convert, render, sse
from gateway.lifecycle import GatewayRuntime
from gateway.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Usage
from gateway.render import FoldedChoice, ResponseMeta
from gateway.routes import responses
from gateway.routes.generation import exchange_id, respond
from mlx_backend.contract import Delta


class ChatRenderer:
    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self._text_slots: dict[int, sse.TextSlot | None] = {}  # per choice: its plain text chunk's slot

    def opening(self, meta: ResponseMeta, index: int) -> ChatCompletionChunk:
        return render.chat_opening_chunk(meta, index)

    def delta(self, meta: ResponseMeta, delta: Delta) -> ChatCompletionChunk | None:
        return render.chat_delta_chunk(meta, delta, self.logprobs)

    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        """A Delta of plain text (the per-token case) fills its choice's slot: the same bytes as rendering
        and encoding its chunk. Anything else in it (tool calls, logprobs, any field a Delta gains) differs
        from the plain Delta below and takes the general way."""
        if delta.text and delta == Delta(delta.request_id, delta.text, delta.tokens, index=delta.index):
            if delta.index not in self._text_slots:
                self._text_slots[delta.index] = sse.TextSlot.of(
                    lambda text: sse.event(self.delta(meta, Delta(delta.request_id, text, 1, index=delta.index))))
            slot = self._text_slots[delta.index]
            if slot is not None:
                return slot.event(delta.text)
        chunk = self.delta(meta, delta)
        return None if chunk is None else sse.event(chunk)

    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> ChatCompletionChunk:
        return render.chat_closing_chunk(meta, index, finish_reason)

    def usage(self, meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
        return render.chat_usage_chunk(meta, usage)

    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> ChatCompletion:
        return render.chat_completion(meta, choices, usage, self.logprobs)


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
    renderer = ChatRenderer(logprobs=command.params.logprobs is not None)
    return await respond(runtime, request, command, meta, renderer, stream=bool(data.stream),
                         include_usage=include_usage)
