"""The gateway's state in one place: readiness, admission (bounded running + queue), drain, health.

Handlers never talk to the engine directly; they go through `GatewayRuntime.run`, which admits the
request, records its metrics, applies the request timeout, and on the way out frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from gateway import metrics
from gateway.errors import ErrorKind, GatewayError
from gateway.protocol import EngineHealth, Health, Model, ModelError, ModelList
from gateway.settings import Settings
from mlx_backend import __version__
from mlx_backend.engine import Engine, EngineState, GenerationStream, unavailable
from mlx_backend.errors import EngineError
from mlx_backend.registry import ModelEntry, ModelRegistry
from mlx_backend.types import Delta, Finished, Generate, Heartbeat, Started

log = logging.getLogger("mlx_gateway")


@dataclass
class _Counts:
    running: int = 0
    waiting: int = 0

    @property
    def total(self) -> int:
        return self.running + self.waiting


class MetricsObserver:
    """Engine-side figures arrive with heartbeats; this turns them into gauges and counters."""

    def __init__(self) -> None:
        self._failed_seen: set[tuple[str, float]] = set()

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


class GatewayRuntime:
    def __init__(self, settings: Settings, engine: Engine, registry: ModelRegistry) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.started_at = time.monotonic()
        self.draining = False
        self._counts = _Counts()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission and generation -------------------------------------------------------------------

    def _admit(self) -> None:
        if self.draining:
            metrics.REQUESTS_REJECTED.labels("draining").inc()
            raise GatewayError(ErrorKind.DRAINING, "The server is shutting down; retry on another instance or later.")
        state = self.engine.status().state
        if state != EngineState.UP:
            metrics.REQUESTS_REJECTED.labels("engine_unavailable").inc()
            raise GatewayError.from_engine(unavailable(state))
        limit = self.settings.max_running + self.settings.max_queue
        if self._counts.total >= limit:
            metrics.REQUESTS_REJECTED.labels("overloaded").inc()
            raise GatewayError(
                ErrorKind.OVERLOADED,
                f"The server is at capacity ({self.settings.max_running} running, "
                f"{self.settings.max_queue} queued); retry after a moment.",
            )

    async def run(self, command: Generate, arrived_at: float) -> GenerationStream:
        """Admit, generate, and account for one request. Raises GatewayError; closing it aborts."""
        self._admit()
        model = command.model
        counts = self._counts
        counts.waiting += 1
        self._idle.clear()
        self._publish_counts()
        state = "waiting"  # then "running" once the engine has it in the batch
        ended = False  # Finished or failed; otherwise the client went away
        first_text_seen = False
        admitted_at = time.monotonic()
        generated = metrics.GENERATION_TOKENS.labels(model)  # looked up once: it is bumped for every delta
        try:
            async for event in self.engine.generate(command, self.settings.request_timeout_s):
                if isinstance(event, Started) and state == "waiting":
                    counts.waiting -= 1
                    counts.running += 1
                    state = "running"
                    self._publish_counts()
                    metrics.QUEUE_TIME.observe(time.monotonic() - admitted_at)
                    metrics.PROMPT_TOKENS.labels(model).inc(event.prompt_tokens)
                    metrics.PROMPT_CACHED_TOKENS.labels(model).inc(event.cached_tokens)
                elif isinstance(event, Delta):
                    generated.inc(event.tokens)
                    if event.text and not first_text_seen:
                        first_text_seen = True
                        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(time.monotonic() - arrived_at)
                elif isinstance(event, Finished):
                    metrics.E2E_LATENCY.labels(model).observe(time.monotonic() - arrived_at)
                    metrics.REQUESTS_FINISHED.labels(model, event.finish_reason).inc()
                    ended = self._release(state)  # before the last yield: the consumer may stop there
                yield event
        except EngineError as exc:
            ended = self._release(state)
            raise GatewayError.from_engine(exc) from exc
        finally:
            if not ended:  # the consumer left early: the client went away
                self._release(state)
                metrics.REQUESTS_CANCELLED.inc()

    def _release(self, state: str) -> bool:
        if state == "waiting":
            self._counts.waiting -= 1
        else:
            self._counts.running -= 1
        self._publish_counts()
        if self._counts.total == 0:
            self._idle.set()
        return True

    def _publish_counts(self) -> None:
        metrics.REQUESTS_RUNNING.set(self._counts.running)
        metrics.REQUESTS_WAITING.set(self._counts.waiting)

    # -- drain ----------------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let running requests finish until the deadline, then end the rest cleanly."""
        self.draining = True
        metrics.DRAINING.set(1)
        metrics.READY.set(0)
        pending = self._counts.total
        log.info("drain: refusing new requests; %d in flight, deadline %.1fs", pending, timeout_s)
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._counts.total:
            ended = self.engine.end_all("length")
            log.warning("drain: deadline reached; ended %d request(s) with a final chunk", ended)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        log.info("drain: done (%d still in flight)", self._counts.total)

    # -- health and models ----------------------------------------------------------------------------

    def health(self) -> Health:
        status = self.engine.status()
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
        metrics.ENGINE_UP.set(1 if status.state == EngineState.UP else 0)
        metrics.ENGINE_STALLED.set(1 if status.stalled else 0)
        metrics.MODELS_AVAILABLE.set(len(entries))
        return Health(
            status=state,  # type: ignore[arg-type]
            ready=ready,
            reason=reason,
            models_loaded=len(heartbeat.loaded) if heartbeat else 0,
            models_available=len(entries),
            requests_running=self._counts.running,
            requests_waiting=self._counts.waiting,
            engine=EngineHealth(
                state=status.state.value, pid=status.pid, restarts=status.restarts, device=status.device,
                last_exit=status.last_exit, seconds_since_progress=status.seconds_since_progress,
            ),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            version=__version__,
        )

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
