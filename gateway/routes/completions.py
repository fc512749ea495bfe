"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway import convert, render, sse
from gateway.lifecycle import GatewayRuntime
from gateway.protocol import Completion, CompletionRequest, Usage
from gateway.render import FoldedChoice, ResponseMeta
from gateway.routes import responses
from gateway.routes.generation import exchange_id, respond
from mlx_backend.contract import Delta


class CompletionRenderer:
    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}  # per choice: where the next chunk's text starts

    def opening(self, meta: ResponseMeta, index: int) -> None:
        return None

    def delta(self, meta: ResponseMeta, delta: Delta) -> Completion | None:
        if not delta.text and not delta.logprobs:
            return None
        offset = self._offsets.get(delta.index, 0)
        self._offsets[delta.index] = offset + len(delta.text)
        logprobs = render.completion_logprobs(delta.logprobs, self.logprobs, offset)
        return render.completion_chunk(meta, delta.index, delta.text, logprobs)

    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        chunk = self.delta(meta, delta)
        return None if chunk is None else sse.event(chunk)

    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> Completion:
        return render.completion_chunk(meta, index, "", finish_reason=render.public_finish_reason(finish_reason))

    def usage(self, meta: ResponseMeta, usage: Usage) -> Completion:
        return render.completion_usage_chunk(meta, usage)

    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> Completion:
        return render.completion(meta, choices, usage, self.logprobs)


@post(
    "/v1/completions",
    status_code=200,
    operation_id="createCompletion",
    summary="Create a text completion (legacy)",
    description="OpenAI-compatible legacy completion; `stream: true` answers with server-sent events.",
    tags=["OpenAI"],
    responses={**responses.GENERATION, 200: responses.ok(Completion, Completion)},
)
async def create_completion(request: Request[Any, Any, Any], data: CompletionRequest) -> Response[Completion] | Stream:
    runtime: GatewayRuntime = request.app.state.runtime
    request_id = exchange_id(request)
    runtime.resolve(data.model)  # 404 for an unknown model before judging its parameters
    command = convert.completion_to_generate(data, request_id, runtime.settings.test_faults)
    meta = ResponseMeta(f"cmpl-{request_id}", data.model)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    renderer = CompletionRenderer(logprobs=command.params.logprobs is not None)
    return await respond(runtime, request, command, meta, renderer, stream=bool(data.stream),
                         include_usage=include_usage)
