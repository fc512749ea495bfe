"""The gateway's state in one place: readiness, admission (bounded running + queue), drain, health.

Handlers never talk to the engine directly: `GatewayRuntime.admit` checks capacity and hands the request
to the engine inside an `Exchange` (gateway/exchange.py), which owns the rest of the request's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from gateway import metrics
from gateway.errors import ErrorKind, GatewayError
from gateway.exchange import Ending, Exchange, Phase
from gateway.protocol import EngineHealth, Health, Model, ModelError, ModelList
from gateway.response_store import ResponseStore
from gateway.settings import Settings
from mlx_backend import __version__
from mlx_backend.engine import Engine, EngineState, unavailable
from mlx_backend.errors import EngineError
from mlx_backend.registry import ModelEntry, ModelRegistry
from mlx_backend.types import Finished, Generate, Heartbeat

log = logging.getLogger("mlx_gateway")


def new_request_id() -> str:
    """Server-made and unique: a client's X-Request-Id is kept for logs, never used as a key."""
    return uuid.uuid4().hex


class MetricsObserver:
    """What the engine client reports: heartbeats become gauges and counters; giving up is remembered so
    the server can exit and let its service manager restart it."""

    def __init__(self) -> None:
        self._failed_seen: set[tuple[str, float]] = set()
        self.gave_up = asyncio.Event()
        self.gave_up_reason: str | None = None

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        metrics.MODELS_LOADED.set(len(heartbeat.loaded))
        metrics.MEMORY_ACTIVE.set(heartbeat.active_memory_bytes)
        metrics.MEMORY_BUDGET.set(heartbeat.memory_budget_bytes)
        metrics.PREFIX_CACHE_BYTES.set(heartbeat.prompt_cache_bytes)
        for failure in heartbeat.failed:
            key = (failure.id, failure.failed_at)
            if key not in self._failed_seen:
                self._failed_seen.add(key)
                metrics.MODEL_LOAD_FAILURES.labels(failure.code).inc()
                log.error("model %s failed to load: %s", failure.id, failure.message)

    def on_restart(self, reason: str) -> None:
        kind = "stalled" if "stalled" in reason else "frozen" if "heartbeat" in reason else "exited"
        metrics.ENGINE_RESTARTS.labels(kind).inc()
        metrics.MODELS_LOADED.set(0)

    def on_cancelled(self, finished: Finished) -> None:
        metrics.CANCELLED_TOKENS.inc(finished.completion_tokens)

    def on_down(self, reason: str) -> None:
        self.gave_up_reason = reason
        self.gave_up.set()


class GatewayRuntime:
    def __init__(
        self, settings: Settings, engine: Engine, registry: ModelRegistry, observer: MetricsObserver | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.observer = observer or MetricsObserver()
        self.started_at = time.monotonic()
        self.draining = False
        self._active: dict[str, Exchange] = {}  # exchanges holding an admission slot
        self._idle = asyncio.Event()
        self._idle.set()
        self.responses = ResponseStore(int(settings.responses_store_mb * 1024 * 1024))  # Responses API

    # -- admission ------------------------------------------------------------------------------------

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

    # -- health and models ----------------------------------------------------------------------------

    def health(self) -> Health:
        status = self.engine.status()
        running, waiting = self.counts()
        heartbeat = status.heartbeat
        entries = self._safe_list()
        failed = {f.id for f in heartbeat.failed} if heartbeat else set()
        loadable = [e for e in entries if e.id not in failed]
        reason: str | None = None
        if self.draining:
            state, reason = "draining", "the server is shutting down"
        elif status.state == EngineState.STARTING:
            state, reason = "starting", "the engine is starting"
        elif status.stalled:
            state, reason = "stalled", "the engine has work but makes no progress"
        elif status.state != EngineState.UP:
            state, reason = "engine_down", f"the engine is {status.state.value}: {status.last_exit or 'no detail'}"
        elif not loadable:
            state = "degraded"
            reason = "no loadable model: " + (
                "no model folders were found" if not entries else "every model failed to load"
            )
        elif failed:
            state = "degraded"
        else:
            state = "ok"
        ready = state in ("ok", "degraded") and bool(loadable)
        metrics.READY.set(1 if ready else 0)
        metrics.REQUESTS_RUNNING.set(running)
        metrics.REQUESTS_WAITING.set(waiting)
        metrics.ENGINE_UP.set(1 if status.state == EngineState.UP else 0)
        metrics.ENGINE_STALLED.set(1 if status.stalled else 0)
        metrics.MODELS_AVAILABLE.set(len(entries))
        return Health(
            status=state,  # type: ignore[arg-type]
            ready=ready,
            reason=reason,
            models_loaded=len(heartbeat.loaded) if heartbeat else 0,
            models_available=len(entries),
            requests_running=running,
            requests_waiting=waiting,
            engine=EngineHealth(
                state=status.state.value, pid=status.pid, restarts=status.restarts, device=status.device,
                last_exit=status.last_exit, seconds_since_progress=status.seconds_since_progress,
                requests_running=heartbeat.running if heartbeat else 0,
                requests_waiting=heartbeat.waiting if heartbeat else 0,
            ),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            version=__version__,
        )

    def alive(self) -> bool:
        """Liveness: false once the engine is given up on, so a service manager restarts the server (the
        server also exits then; this covers the seconds in between and a wedged exit)."""
        return self.engine.status().state != EngineState.DOWN

    def refresh_gauges(self) -> None:
        """Scrape-time gauges: health state, and the external watchdog's ledger when configured."""
        self.health()
        state_dir = self.settings.watchdog_state_dir
        if state_dir is None:
            return
        try:
            from gateway.watchdog import read_status

            watchdog = read_status(state_dir)
        except Exception:  # the watchdog's files are not ours to trust; never fail a scrape on them
            log.warning("could not read the watchdog state in %s", state_dir, exc_info=True)
            return
        if watchdog is not None:
            metrics.WATCHDOG_RESTARTS_LAST_HOUR.set(watchdog.restarts_last_hour)
            metrics.WATCHDOG_GAVE_UP.set(1 if watchdog.gave_up else 0)

    def _safe_list(self) -> list[ModelEntry]:
        try:
            return self.registry.list()
        except Exception:  # a listing problem must never take health down
            log.exception("listing models failed")
            return []

    def models(self) -> ModelList:
        return ModelList(data=[self._describe(e) for e in self._safe_list()])

    def model(self, model_id: str) -> Model:
        try:
            entry = self.registry.resolve(model_id)
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc
        return self._describe(entry)

    def resolve(self, model_id: str) -> None:
        """404 before any work when the id names no model folder."""
        try:
            self.registry.resolve(model_id)
        except EngineError as exc:
            raise GatewayError.from_engine(exc) from exc

    def _describe(self, entry: ModelEntry) -> Model:
        heartbeat = self.engine.status().heartbeat
        loaded = {m.id for m in heartbeat.loaded} if heartbeat else set()
        failures = {f.id: f for f in heartbeat.failed} if heartbeat else {}
        status = "available"
        error = None
        if entry.id in loaded:
            status = "loaded"
        elif heartbeat is not None and heartbeat.loading == entry.id:
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
        )


def _owner(entry: ModelEntry) -> str:
    if "/" in entry.id:
        return entry.id.split("/", 1)[0]
    return "mlx-gateway" if entry.source == "demo" else "local"
