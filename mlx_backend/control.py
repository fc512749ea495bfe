"""An operator's commands on the MLX thread: load, unload, pin, unpin (the gateway's admin API), and the
models the engine was started with (preload, pinned).

Every command is answered with ModelControlDone, after a heartbeat that already shows its effect, so the
gateway's answer describes the model as it is now. A load (or a pin, which loads) is answered only once the
model is ready, warm-up included, or with the error its load failed with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from mlx_backend.cache import ModelCache
from mlx_backend.contract import Event, Heartbeat, ModelControl, ModelControlDone
from mlx_backend.errors import EngineError

log = logging.getLogger("mlx_gateway.engine.control")


class Controls:
    def __init__(
        self,
        cache: ModelCache,
        emit: Callable[[Event], None],
        busy: Callable[[], set[str]],
        heartbeat: Callable[[], Heartbeat],
    ) -> None:
        self._cache = cache
        self._emit = emit
        self._busy = busy
        self._heartbeat = heartbeat
        self._waiting: dict[str, list[str]] = {}  # model id -> control request ids waiting for its load
        cache.on_load_done = self._load_done

    def preload(self, preload: Sequence[str], pinned: Sequence[str]) -> None:
        """Queue the start-up models; a failure is logged and shows in the model list, never fatal."""
        for model_id in dict.fromkeys([*pinned, *preload]):
            try:
                self._cache.request_load(model_id, self._busy(), pin=model_id in pinned, reason="preload")
            except EngineError as exc:
                log.error("cannot preload model %s: %s", model_id, exc.message)

    def handle(self, command: ModelControl) -> None:
        busy = self._busy()
        try:
            if command.action in ("load", "pin"):
                cached = self._cache.request_load(command.model, busy, pin=command.action == "pin")
                if cached is None:
                    self._waiting.setdefault(command.model, []).append(command.request_id)
                    return
            elif command.action == "unload":
                self._cache.unload(command.model, busy)
            else:
                self._cache.registry.resolve(command.model)  # an unknown id is a 404, as everywhere
                self._cache.unpin(command.model)
        except EngineError as exc:
            self._answer(command.request_id, exc)
            return
        log.info("operator: %s %s", command.action, command.model)
        self._answer(command.request_id, None)

    def _load_done(self, model_id: str, error: EngineError | None) -> None:
        for request_id in self._waiting.pop(model_id, []):
            self._answer(request_id, error)

    def _answer(self, request_id: str, error: EngineError | None) -> None:
        self._emit(self._heartbeat())
        if error is None:
            self._emit(ModelControlDone(request_id))
        else:
            self._emit(ModelControlDone(request_id, error.code.value, error.message))
