"""POST /v1/embeddings"""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, post
from litestar.openapi import ResponseSpec

from gateway import metrics, openapi_errors
from gateway.embeddings import convert
from gateway.embeddings.wire import EmbeddingList, EmbeddingRequest
from gateway.runtime import GatewayRuntime
from gateway.serving.generation import exchange_id


@post(
    "/v1/embeddings",
    status_code=200,
    operation_id="createEmbedding",
    summary="Create embeddings",
    description="OpenAI-compatible embeddings from an embedding model (BERT-family encoders, Qwen3-Embedding): "
                "strings or token-id arrays (read as OpenAI's cl100k_base ids), `encoding_format` float or "
                "base64, `dimensions` for models trained for it (Matryoshka). A chat model is a 400.",
    tags=["OpenAI"],
    responses={**openapi_errors.GENERATION, 200: ResponseSpec(EmbeddingList, generate_examples=False)},
)
async def create_embedding(request: Request[Any, Any, Any], data: EmbeddingRequest) -> EmbeddingList:
    runtime: GatewayRuntime = request.app.state.runtime
    runtime.catalog.resolve(data.model)  # 404 for an unknown model before judging its input
    command = convert.to_embed(data, exchange_id(request))
    # Admitted, timed, drained and counted like a generation: one Exchange owns it (gateway/exchange.py).
    exchange = runtime.admission.admit(command, time.monotonic())
    exchange.watch_disconnect(request.receive)
    try:
        await exchange.started()  # its model loaded, every input fits the context
        answer = await exchange.embedded()
    finally:
        exchange.close()
    metrics.EMBEDDING_INPUTS.labels(data.model).inc(len(command.inputs))
    return convert.response(data, answer)
