"""Loaded models within a memory budget: load on first use, evict the least recently used idle model,
refuse a model too large for the budget before reading its weights, and remember failures.

A failure is re-raised as it was, without a new attempt, until `retry_backoff_s` passes or the model's
files change (a user fixing a broken folder should not have to wait). A loaded model whose files changed
or vanished is reloaded, or fails cleanly, on its next use. Used by the MLX thread only; `snapshot()` may be
called from the heartbeat thread, so the tables are guarded by a lock that is never held while loading.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import mlx.core as mx

from mlx_backend import loader
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.loader import LoadedArtifacts
from mlx_backend.registry import Fingerprint, ModelEntry, ModelRegistry
from mlx_backend.types import FailedModel, LoadedModel

log = logging.getLogger("mlx_gateway.engine.cache")

# Failures that come from the files themselves: retrying before they change would fail the same way.
_REMEMBERED = {
    EngineErrorCode.MODEL_LOAD_FAILED, EngineErrorCode.MODEL_UNSUPPORTED, EngineErrorCode.MODEL_TOO_LARGE,
}


@dataclass
class CachedModel:
    entry: ModelEntry
    artifacts: LoadedArtifacts
    size_bytes: int
    loaded_at: float  # unix time
    last_used: float  # monotonic

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass(frozen=True)
class _Failure:
    error: EngineError
    failed_at: float  # unix time, for the heartbeat
    failed_mono: float
    fingerprint: Fingerprint


def default_memory_budget() -> int:
    """What the models may use when no budget is set: the GPU's recommended working set where there is one,
    else half of physical memory (the OS, the gateway and the KV caches need the rest)."""
    try:
        if mx.metal.is_available():
            info = mx.device_info()
            recommended = int(info.get("max_recommended_working_set_size", 0))
            if recommended > 0:
                return recommended
    except Exception:  # an odd build without device_info: fall back to RAM
        log.debug("no device info", exc_info=True)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ModelCache:
    def __init__(
        self,
        registry: ModelRegistry,
        memory_budget_bytes: int,
        retry_backoff_s: float,
        *,
        validate: Callable[[ModelEntry], int] = loader.validate,
        load: Callable[[ModelEntry], LoadedArtifacts] = loader.load,
    ) -> None:
        self.registry = registry
        self.budget = memory_budget_bytes if memory_budget_bytes > 0 else default_memory_budget()
        self.retry_backoff_s = retry_backoff_s
        self._validate = validate
        self._load = load
        self._models: dict[str, CachedModel] = {}
        self._failures: dict[str, _Failure] = {}
        self._lock = threading.Lock()
        self.loading: str | None = None  # read by the heartbeat thread
        self.loads = 0  # successful loads so far
        self.changes = 0  # bumped whenever the loaded or failed models change: worth a fresh heartbeat
        self.on_evict: Callable[[str], None] = lambda model_id: None  # the batcher drops its state first

    # -- the one entry point -----------------------------------------------------------------------------

    def get(
        self, model_id: str, busy: Collection[str] = (), on_load: Callable[[], None] = lambda: None
    ) -> CachedModel:
        """The loaded model for an id, loading it if needed (`on_load` is called just before a load).
        `busy` names models with requests in flight: they are never evicted or reloaded under those
        requests. Raises EngineError."""
        try:
            entry = self.registry.resolve(model_id)
        except EngineError:
            self._forget_failure(model_id)
            if model_id in self._models and model_id not in busy:
                log.info("model %s vanished from disk; unloading it", model_id)
                self._evict(model_id)
            raise
        cached = self._models.get(model_id)
        if cached is not None:
            if cached.entry.fingerprint == entry.fingerprint or model_id in busy:
                cached.last_used = time.monotonic()
                return cached
            log.info("the files of model %s changed; reloading it", model_id)
            self._evict(model_id)
        self._raise_remembered(entry)
        try:
            return self._load_within_budget(entry, busy, on_load)
        except EngineError as exc:
            if exc.code in _REMEMBERED:
                with self._lock:
                    self._failures[model_id] = _Failure(exc, time.time(), time.monotonic(), entry.fingerprint)
                self.changes += 1
            raise

    def _raise_remembered(self, entry: ModelEntry) -> None:
        failure = self._failures.get(entry.id)
        if failure is None:
            return
        fresh = time.monotonic() - failure.failed_mono < self.retry_backoff_s
        if fresh and failure.fingerprint == entry.fingerprint:
            raise failure.error
        self._forget_failure(entry.id)

    def _forget_failure(self, model_id: str) -> None:
        with self._lock:
            if self._failures.pop(model_id, None) is not None:
                self.changes += 1

    def _load_within_budget(
        self, entry: ModelEntry, busy: Collection[str], on_load: Callable[[], None]
    ) -> CachedModel:
        size = self._validate(entry)  # headers only: a model too large is refused before any weight is read
        if size > self.budget:
            raise EngineError(
                EngineErrorCode.MODEL_TOO_LARGE,
                f"The model '{entry.id}' needs {_gb(size)} of memory for its weights; the engine's memory "
                f"budget is {_gb(self.budget)}.",
            )
        self._make_room(entry.id, size, busy)
        on_load()
        self.loading = entry.id
        try:
            artifacts = self._load(entry)
        finally:
            self.loading = None
        cached = CachedModel(entry, artifacts, artifacts.size_bytes or size, time.time(), time.monotonic())
        self.loads += 1
        self.changes += 1
        with self._lock:
            self._models[entry.id] = cached
        return cached

    def _make_room(self, model_id: str, size: int, busy: Collection[str]) -> None:
        """Evict idle models, least recently used first, until `size` more bytes fit."""
        while self.used_bytes + size > self.budget:
            idle = [m for m in self._models.values() if m.id not in busy]
            if not idle:
                raise EngineError(
                    EngineErrorCode.ENGINE_OVERLOADED,
                    f"The model '{model_id}' needs {_gb(size)} but {_gb(self.used_bytes)} of the "
                    f"{_gb(self.budget)} budget is held by models serving requests; retry shortly.",
                )
            victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting model %s (least recently used) to make room for %s", victim.id, model_id)
            self._evict(victim.id)

    def _evict(self, model_id: str) -> None:
        self.on_evict(model_id)  # the batcher lets go of its generator and prefix cache first
        with self._lock:
            self._models.pop(model_id, None)
        self.changes += 1
        gc.collect()  # the model's arrays go now, not at some later collection
        mx.clear_cache()

    def clear(self) -> None:
        for model_id in list(self._models):
            self._evict(model_id)
        with self._lock:
            self._failures.clear()
        self.changes += 1

    # -- what the heartbeat reports ---------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(m.size_bytes for m in self._models.values())

    def holds(self, cached: CachedModel) -> bool:
        return self._models.get(cached.id) is cached

    def snapshot(self, running: Mapping[str, int]) -> tuple[tuple[LoadedModel, ...], tuple[FailedModel, ...]]:
        now = time.monotonic()
        with self._lock:
            loaded = tuple(
                LoadedModel(m.id, m.size_bytes, m.loaded_at, running.get(m.id, 0))
                for m in self._models.values()
            )
            failed = tuple(
                FailedModel(
                    model_id, f.error.code.value, f.error.message, f.failed_at,
                    round(max(0.0, self.retry_backoff_s - (now - f.failed_mono)), 3),
                )
                for model_id, f in self._failures.items()
            )
        return loaded, failed


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"
