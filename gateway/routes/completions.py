"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway import convert
from gateway.convert import ResponseMeta
from gateway.lifecycle import GatewayRuntime
from gateway.protocol import Completion, CompletionRequest
from gateway.routes import responses
from gateway.routes.generation import exchange_id, respond
from mlx_backend.types import Finished


class CompletionRenderer:
    def opening(self, meta: ResponseMeta) -> None:
        return None

    def text(self, meta: ResponseMeta, text: str) -> Completion:
        return convert.completion_chunk(meta, text)

    def closing(self, meta: ResponseMeta, finish_reason: str) -> Completion:
        return convert.completion_chunk(meta, "", finish_reason)

    def usage(self, meta: ResponseMeta, finished: Finished) -> Completion:
        return convert.completion_usage_chunk(meta, finished)

    def whole(self, meta: ResponseMeta, text: str, finished: Finished) -> Completion:
        return convert.completion(meta, text, finished)


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
    return await respond(runtime, request, command, meta, CompletionRenderer(), stream=bool(data.stream),
                         include_usage=include_usage)
