"""The models on this machine: `GET /v1/models[/{id}]` (answered from disk and the last heartbeat, never the
engine) and the admin API.

The admin API loads, unloads, pins and unpins a model, beside the OpenAI API, under the same API key.
Each answers with the model as `GET /v1/models/{id}` describes it, once the command is done: a load (and a
pin, which loads) answers when the model is ready to serve, warm-up included, or with the load's error
(500 model_load_failed..., 429 when the memory is held by pinned models). An id the allow-list hides is a
404, as everywhere.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post

from gateway import openapi_errors
from gateway.admin.wire import Model, ModelAction, ModelList
from gateway.runtime import GatewayRuntime
from mlx_backend.client.engine import ControlAction


async def _act(request: Request[Any, Any, Any], action: ControlAction, data: ModelAction) -> Model:
    runtime: GatewayRuntime = request.app.state.runtime
    return await runtime.catalog.control(action, data.model)


@post("/admin/models/load", status_code=200, operation_id="adminLoadModel", tags=["Admin"],
      summary="Load a model now; answers when it is ready", responses=openapi_errors.ADMIN)
async def load_model(request: Request[Any, Any, Any], data: ModelAction) -> Model:
    return await _act(request, "load", data)


@post("/admin/models/unload", status_code=200, operation_id="adminUnloadModel", tags=["Admin"],
      summary="Unload a model now (and unpin it); 409 while it serves requests", responses=openapi_errors.ADMIN)
async def unload_model(request: Request[Any, Any, Any], data: ModelAction) -> Model:
    return await _act(request, "unload", data)


@post("/admin/models/pin", status_code=200, operation_id="adminPinModel", tags=["Admin"],
      summary="Load a model if needed and keep it: never idle-unloaded or evicted", responses=openapi_errors.ADMIN)
async def pin_model(request: Request[Any, Any, Any], data: ModelAction) -> Model:
    return await _act(request, "pin", data)


@post("/admin/models/unpin", status_code=200, operation_id="adminUnpinModel", tags=["Admin"],
      summary="Back to the keep-alive rules, counted from now", responses=openapi_errors.ADMIN)
async def unpin_model(request: Request[Any, Any, Any], data: ModelAction) -> Model:
    return await _act(request, "unpin", data)


ROUTES = [load_model, unload_model, pin_model, unpin_model]


@get("/v1/models", operation_id="listModels", summary="List the models on this machine", tags=["OpenAI"],
     responses=openapi_errors.COMMON)
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime.catalog.models()


@get(
    "/v1/models/{model_id:path}",
    operation_id="retrieveModel",
    summary="Describe one model",
    description="Ids may contain one slash (`org/name`), as in the Hugging Face cache.",
    tags=["OpenAI"],
    responses=openapi_errors.MODEL_LOOKUP,
)
async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> Model:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime.catalog.model(model_id.lstrip("/"))
