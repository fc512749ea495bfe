"""Admission of generation requests: bounded running + queued, and the drain that ends them at shutdown.

Handlers never talk to the engine directly: `Admission.admit` checks capacity and hands the request to the
engine inside an `Exchange` (gateway/serving/exchange.py), which owns the rest of the request's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway import metrics
from gateway.errors import ErrorKind, GatewayError
from gateway.serving.exchange import Ending, Exchange, Phase
from gateway.settings import Settings
from mlx_backend.client.engine import Engine, EngineState, unavailable
from mlx_backend.contract import Generate
from mlx_backend.errors import EngineError

log = logging.getLogger("mlx_gateway")


class Admission:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.draining = False
        self._active: dict[str, Exchange] = {}  # exchanges holding an admission slot
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, command: Generate, arrived_at: float | None = None) -> Exchange:
        """Take a slot and hand the request to the engine; the returned Exchange owns it from here.
        Raises GatewayError (503 draining or engine unavailable, 429 at capacity)."""
        if self.draining:
            metrics.REQUESTS_REJECTED.labels("draining").inc()
            raise GatewayError(ErrorKind.DRAINING, "The server is shutting down; retry on another instance or later.")
        state = self.engine.status().state
        if state != EngineState.UP:
            metrics.REQUESTS_REJECTED.labels("engine_unavailable").inc()
            raise GatewayError.from_engine(unavailable(state))
        if len(self._active) >= self.settings.max_running + self.settings.max_queue:
            metrics.REQUESTS_REJECTED.labels("overloaded").inc()
            raise GatewayError(
                ErrorKind.OVERLOADED,
                f"The server is at capacity ({self.settings.max_running} running, "
                f"{self.settings.max_queue} queued); retry after a moment.",
            )
        try:
            engine_request = self.engine.submit(command)
        except EngineError as exc:
            metrics.REQUESTS_REJECTED.labels("engine_unavailable").inc()
            raise GatewayError.from_engine(exc) from exc
        exchange = Exchange(command, engine_request, timeout_s=self.settings.request_timeout_s or None,
                            on_end=self._release, arrived_at=arrived_at)
        self._active[exchange.id] = exchange
        self._idle.clear()
        return exchange

    async def count_prompt(self, command: Generate) -> int:
        """The prompt tokens `command` would run with, counted by the engine without running it (no slot:
        nothing is generated). Refused while draining, like new work. Raises GatewayError."""
        if self.draining:
            raise GatewayError(ErrorKind.DRAINING, "The server is shutting down; retry on another instance or later.")
        state = self.engine.status().state
        if state != EngineState.UP:
            raise GatewayError.from_engine(unavailable(state))
        try:
            return await asyncio.wait_for(self.engine.count_prompt(command), self.settings.request_timeout_s or None)
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc
        except TimeoutError:
            raise GatewayError(ErrorKind.TIMEOUT, f"Counting the prompt took longer than the "
                                                  f"{self.settings.request_timeout_s:g}s request timeout.") from None

    def _release(self, exchange: Exchange) -> None:
        self._active.pop(exchange.id, None)
        if not self._active:
            self._idle.set()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) among the admitted requests."""
        running = sum(1 for e in self._active.values() if e.phase == Phase.RUNNING)
        return running, len(self._active) - running

    # -- drain ----------------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let admitted requests finish until the deadline, then end the rest cleanly:
        running ones with a final chunk, queued ones with 503 (they never started)."""
        self.draining = True
        metrics.DRAINING.set(1)
        metrics.READY.set(0)
        running, waiting = self.counts()
        log.info("drain: refusing new requests; %d running, %d queued, deadline %.1fs", running, waiting, timeout_s)
        if self._active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._active:
            running, waiting = self.counts()
            for exchange in list(self._active.values()):
                exchange.end(Ending.DRAINED)
            log.warning("drain: deadline reached; ended %d running request(s) with a final chunk and %d queued "
                        "one(s) with 503", running, waiting)
        log.info("drain: done")
