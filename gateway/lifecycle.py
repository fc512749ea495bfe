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
from collections import deque
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.errors import ErrorKind, GatewayError
from gateway.exchange import Ending, Exchange, Phase
from gateway.group_health import group_health
from gateway.protocol import (
    EngineHealth,
    Health,
    LoadProgress,
    MemoryHealth,
    Model,
    ModelError,
    ModelList,
    ResidentModel,
)
from gateway.response_store import ResponseStore
from gateway.settings import Settings
from mlx_backend import __version__
from mlx_backend.client.engine import ControlAction, Engine, EngineState, unavailable
from mlx_backend.contract import Finished, Generate, Heartbeat, LoadedModel, ModelEvent
from mlx_backend.errors import EngineError
from mlx_backend.registry import ModelEntry, ModelRegistry
from mlx_backend.residency import KeepAlive

log = logging.getLogger("mlx_gateway")

_RATE_WINDOW_S = 10.0

if TYPE_CHECKING:
    from gateway.watchdog.state import WatchdogStatus


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
        metrics.MEMORY_WEIGHTS.set(heartbeat.weights_bytes)
        metrics.MEMORY_KV_CACHE.set(heartbeat.kv_bytes)
        metrics.MODELS_PINNED.set(sum(1 for m in heartbeat.loaded if m.pinned))
        load = heartbeat.load
        metrics.MODEL_LOAD_BYTES_READ.set(load.bytes_read if load else 0)
        metrics.MODEL_LOAD_BYTES_TOTAL.set(load.bytes_total if load else 0)
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

    def on_model_event(self, event: ModelEvent) -> None:
        if event.kind == "loaded":
            metrics.MODEL_LOADS.labels(event.reason).inc()
            metrics.MODEL_LOAD_SECONDS.observe(event.seconds)
            if event.warmup_s is not None:
                metrics.MODEL_WARMUP_SECONDS.observe(event.warmup_s)
            warm = f", warm-up {event.warmup_s:.2f}s" if event.warmup_s is not None else ""
            log.info("model %s loaded in %.1fs (%.2f GB, asked for by %s%s)", event.model, event.seconds,
                     event.size_bytes / 1e9, event.reason, warm)
        else:
            metrics.MODEL_UNLOADS.labels(event.reason).inc()
            log.info("model %s unloaded (%s) after %.0fs unused", event.model, event.reason, event.seconds)

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
        self.keep_alive = KeepAlive.parse(settings.keep_alive_s, settings.model_keep_alive)
        self._token_samples: deque[tuple[float, float]] = deque()
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
                group=group_health(status.group),
            ),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            version=__version__,
            models=self._residents(heartbeat),
            memory=MemoryHealth(
                budget_bytes=heartbeat.memory_budget_bytes, weights_bytes=heartbeat.weights_bytes,
                kv_cache_bytes=heartbeat.kv_bytes, prefix_cache_bytes=heartbeat.prompt_cache_bytes,
                active_bytes=heartbeat.active_memory_bytes,
            ) if heartbeat else None,
        )

    @staticmethod
    def _residents(heartbeat: Heartbeat | None) -> list[ResidentModel]:
        if heartbeat is None:
            return []
        models = [
            ResidentModel(id=m.id, status="loaded", size_bytes=m.size_bytes, pinned=m.pinned,
                          requests_running=m.running, loaded_at=m.loaded_at, last_used_at=m.last_used_at,
                          expires_at=m.expires_at, progress=None)
            for m in heartbeat.loaded
        ]
        loading = [heartbeat.load.model] if heartbeat.load else []
        for model_id in [*loading, *heartbeat.queued_loads]:
            progress = _progress(heartbeat, model_id)
            models.append(ResidentModel(id=model_id, status="loading", size_bytes=progress.bytes_total if progress
                                        else 0, pinned=False, requests_running=0, loaded_at=None,
                                        last_used_at=None, expires_at=None, progress=progress))
        return models

    def alive(self) -> bool:
        """Liveness: false once the engine is given up on, so a service manager restarts the server (the
        server also exits then; this covers the seconds in between and a wedged exit)."""
        return self.engine.status().state != EngineState.DOWN

    def refresh_gauges(self) -> None:
        """Scrape-time gauges: health state, and the external watchdog's ledger when configured."""
        self.health()
        watchdog = self.watchdog_status()
        if watchdog is not None:
            metrics.WATCHDOG_RESTARTS_LAST_HOUR.set(watchdog.restarts_last_hour)
            metrics.WATCHDOG_GAVE_UP.set(1 if watchdog.gave_up else 0)

    def watchdog_status(self) -> WatchdogStatus | None:
        """The external watchdog's state when `watchdog_state_dir` is set and readable; never raises."""
        state_dir = self.settings.watchdog_state_dir
        if state_dir is None:
            return None
        try:
            from gateway.watchdog import read_status

            return read_status(state_dir)
        except Exception:  # the watchdog's files are not ours to trust; never fail a scrape on them
            log.warning("could not read the watchdog state in %s", state_dir, exc_info=True)
            return None

    def tokens_per_second(self) -> float | None:
        """Generated tokens per second over the last ~10 s, from the token counter; sampled whenever asked
        (the status page asks every few seconds), so None until two samples are far enough apart."""
        now = time.monotonic()
        total = sum(s.value for metric in metrics.GENERATION_TOKENS.collect() for s in metric.samples
                    if s.name.endswith("_total"))
        samples = self._token_samples
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= _RATE_WINDOW_S:
            samples.popleft()
        then, before = samples[0]
        if now - then < 1.0:
            return None
        return max(0.0, total - before) / (now - then)

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

    async def control(self, action: ControlAction, model_id: str) -> Model:
        """An operator's command on a model (the admin API): answers once it is done (a load: once the model
        is ready to serve), with the model as it is then. Raises GatewayError (404, 409, the load's error,
        503, 504)."""
        self.resolve(model_id)
        if self.draining:
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
        progress = _progress(heartbeat, entry.id) if heartbeat else None
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


def _progress(heartbeat: Heartbeat, model_id: str) -> LoadProgress | None:
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
