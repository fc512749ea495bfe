"""The models on this machine as the API describes them: listed from disk and the last heartbeat (never a
call to the engine), resolved (404 before any work), and operators' commands on them (the admin API)."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.admin.wire import LoadProgress, Model, ModelError, ModelList
from gateway.errors import ErrorKind, GatewayError
from gateway.serving.admission import Admission
from gateway.settings import Settings
from mlx_backend.client.engine import ControlAction, Engine
from mlx_backend.contract import Heartbeat, LoadedModel
from mlx_backend.errors import EngineError
from mlx_backend.keep_alive import KeepAlive
from mlx_backend.registry import ModelEntry, ModelRegistry

log = logging.getLogger("mlx_gateway")


class ModelCatalog:
    def __init__(self, settings: Settings, engine: Engine, registry: ModelRegistry, admission: Admission) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.keep_alive = KeepAlive.parse(settings.keep_alive_s, settings.model_keep_alive)
        self._admission = admission  # an operator's command is refused while draining, like new work

    def entries(self) -> list[ModelEntry]:
        try:
            return self.registry.list()
        except Exception:  # a listing problem must never take health down
            log.exception("listing models failed")
            return []

    def models(self) -> ModelList:
        return ModelList(data=[self._describe(e) for e in self.entries()])

    def model(self, model_id: str) -> Model:
        try:
            entry = self.registry.resolve(model_id)
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc
        return self._describe(entry)

    async def control(self, action: ControlAction, model_id: str) -> Model:
        """An operator's command on a model (the admin API): answers once it is done (a load: once the model
        is ready to serve), with the model as it is then. Raises GatewayError (404, 409, the load's error,
        503, 504)."""
        self.resolve(model_id)
        if self._admission.draining:
            raise GatewayError(ErrorKind.DRAINING, "The server is shutting down.")
        limit = self.settings.load_timeout_s
        try:
            await asyncio.wait_for(self.engine.control(action, model_id), limit)
        except TimeoutError:
            raise GatewayError(ErrorKind.TIMEOUT, f"The model '{model_id}' was not ready within {limit:g}s "
                                                  "(load_timeout_s); it may still be loading.") from None
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc
        return self.model(model_id)

    def resolve(self, model_id: str) -> None:
        """404 before any work when the id names no model folder."""
        try:
            self.registry.resolve_recent(model_id)
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc

    def _describe(self, entry: ModelEntry) -> Model:
        heartbeat = self.engine.status().heartbeat
        loaded: dict[str, LoadedModel] = {m.id: m for m in heartbeat.loaded} if heartbeat else {}
        failures = {f.id: f for f in heartbeat.failed} if heartbeat else {}
        status = "available"
        error = None
        resident = loaded.get(entry.id)
        progress = load_progress(heartbeat, entry.id) if heartbeat else None
        if resident is not None:
            status = "loaded"
        elif progress is not None:
            status = "loading"
        elif entry.id in failures:
            failure = failures[entry.id]
            status = "failed"
            error = ModelError(code=failure.code, message=failure.message, retry_after_s=failure.retry_after_s)
        return Model(
            id=entry.id, created=entry.created, owned_by=_owner(entry),
            context_length=entry.context_length, size_bytes=entry.size_bytes, source=entry.source,
            status=status,  # type: ignore[arg-type]
            loaded=status == "loaded", error=error,
            pinned=resident.pinned if resident else False,
            keep_alive_s=self.keep_alive.for_model(entry.id),
            loaded_at=resident.loaded_at if resident else None,
            last_used_at=resident.last_used_at if resident else None,
            expires_at=resident.expires_at if resident else None,
            requests_running=resident.running if resident else 0,
            progress=progress,
            load_s=resident.load_s if resident else None,
            warmup_s=resident.warmup_s if resident else None,
        )


def load_progress(heartbeat: Heartbeat, model_id: str) -> LoadProgress | None:
    """A model's load progress from a heartbeat: running, or queued behind another load; None otherwise."""
    load = heartbeat.load
    if load is not None and load.model == model_id:
        return LoadProgress(stage=load.stage, bytes_read=load.bytes_read, bytes_loaded=load.bytes_loaded,
                            bytes_total=load.bytes_total, elapsed_s=round(max(0.0, time.time() - load.started_at), 3))
    if model_id in heartbeat.queued_loads or (heartbeat.loading == model_id and load is None):
        return LoadProgress(stage="queued", bytes_read=0, bytes_loaded=0, bytes_total=0, elapsed_s=0.0)
    return None


def _owner(entry: ModelEntry) -> str:
    if "/" in entry.id:
        return entry.id.split("/", 1)[0]
    return "mlx-gateway" if entry.source in ("demo", "bundled") else "local"
