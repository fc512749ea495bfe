"""What the engine client reports (heartbeats, restarts, loads and unloads, giving up) as metrics and log
lines; giving up is remembered so the server can exit and let its service manager restart it."""

from __future__ import annotations

import asyncio
import logging

from gateway import metrics
from mlx_backend.contract import Finished, Heartbeat, ModelEvent

log = logging.getLogger("mlx_gateway")


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
