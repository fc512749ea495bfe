"""GET /v1/models and GET /v1/models/{id}: answered from disk and the last heartbeat, never the engine."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.lifecycle import GatewayRuntime
from gateway.protocol import Model, ModelList
from gateway.routes import responses


@get("/v1/models", operation_id="listModels", summary="List the models on this machine", tags=["OpenAI"],
     responses=responses.COMMON)
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime.models()


@get(
    "/v1/models/{model_id:path}",
    operation_id="retrieveModel",
    summary="Describe one model",
    description="Ids may contain one slash (`org/name`), as in the Hugging Face cache.",
    tags=["OpenAI"],
    responses=responses.MODEL_LOOKUP,
)
async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> Model:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime.model(model_id.lstrip("/"))
