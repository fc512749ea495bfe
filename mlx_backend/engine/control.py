"""An operator's commands on the MLX thread: load, unload, pin, unpin (the gateway's admin API), and the
models the engine was started with (preload, pinned).

Every command is answered with ModelControlDone, after a heartbeat that already shows its effect, so the
gateway's answer describes the model as it is now. A load (or a pin, which loads) waits for its model like
any waiter (`Residency.wait_for`): it is answered when the outcome is delivered, at once when the model is
loaded or cannot be, else once its load ends, warm-up included, with the error the load failed with if it did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from mlx_backend.contract import Event, Heartbeat, ModelControl, ModelControlDone
from mlx_backend.engine.residency.load_queue import LoadOutcome, Waiter
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.errors import EngineError

log = logging.getLogger("mlx_gateway.engine.control")


class Controls:
    def __init__(
        self,
        residency: Residency,
        emit: Callable[[Event], None],
        busy: Callable[[], set[str]],
        heartbeat: Callable[[], Heartbeat],
    ) -> None:
        self._residency = residency
        self._emit = emit
        self._busy = busy
        self._heartbeat = heartbeat

    def preload(self, preload: Sequence[str], pinned: Sequence[str]) -> None:
        """Queue the start-up models; a failure is logged and shows in the model list, never fatal."""
        for model_id in dict.fromkeys([*pinned, *preload]):
            self._residency.wait_for(model_id, Waiter(f"preload:{model_id}", "preload", _preloaded), self._busy(),
                                     pin=model_id in pinned)

    def handle(self, command: ModelControl) -> None:
        if command.action in ("load", "pin"):
            waiter = Waiter(command.request_id, "admin", lambda outcome: self._answer(command, outcome.error))
            self._residency.wait_for(command.model, waiter, self._busy(), pin=command.action == "pin")
            return
        try:
            if command.action == "unload":
                self._residency.unload(command.model, self._busy())
            else:
                self._residency.unpin(command.model)
        except EngineError as exc:
            self._answer(command, exc)
            return
        self._answer(command, None)

    def _answer(self, command: ModelControl, error: EngineError | None) -> None:
        self._emit(self._heartbeat())
        if error is None:
            log.info("operator: %s %s", command.action, command.model)
            self._emit(ModelControlDone(command.request_id))
        else:
            self._emit(ModelControlDone(command.request_id, error.code.value, error.message))


def _preloaded(outcome: LoadOutcome) -> None:
    if outcome.error is not None:
        log.error("cannot preload model %s: %s", outcome.model_id, outcome.error.message)
