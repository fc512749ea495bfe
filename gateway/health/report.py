"""What the server reports about itself: /health (state, readiness and why), liveness, the scrape-time
gauges, the status page's token rate, and the external watchdog's state when configured."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.admin.catalog import ModelCatalog, load_progress
from gateway.health.group import group_health
from gateway.health.wire import EngineHealth, Health, MemoryHealth, ResidentModel
from gateway.serving.admission import Admission
from gateway.settings import Settings
from mlx_backend import __version__
from mlx_backend.client.engine import Engine, EngineState
from mlx_backend.contract import Heartbeat

if TYPE_CHECKING:
    from gateway.watchdog.state import WatchdogStatus

log = logging.getLogger("mlx_gateway")

_RATE_WINDOW_S = 10.0


class HealthReporter:
    def __init__(self, settings: Settings, engine: Engine, admission: Admission, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.engine = engine
        self._admission = admission
        self._catalog = catalog
        self._token_samples: deque[tuple[float, float]] = deque()
        self.started_at = time.monotonic()

    def report(self) -> Health:
        status = self.engine.status()
        running, waiting = self._admission.counts()
        heartbeat = status.heartbeat
        entries = self._catalog.entries()
        failed = {f.id for f in heartbeat.failed} if heartbeat else set()
        loadable = [e for e in entries if e.id not in failed]
        reason: str | None = None
        if self._admission.draining:
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
            progress = load_progress(heartbeat, model_id)
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
        self.report()
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
