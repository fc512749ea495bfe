"""The models in memory, within a budget that counts everything (mlx_backend/engine/residency/memory.py): which
are loaded, which failed and are remembered, which are pinned, and which may go to make room or because their
keep-alive ran out (mlx_backend/keep_alive.py).

Room is made by trimming the prefix cache (it is only a cache), then by evicting idle, unpinned models, least
recently used first; what running requests hold is waited for; what pinned models hold is never taken. A
failure is re-raised as it was, without a new attempt, until `retry_backoff_s` passes or the model's files
change (a user fixing a broken folder should not have to wait). A loaded model whose files changed or vanished
is reloaded, or fails cleanly, on its next use. Used by the MLX thread; `snapshot` may be called from the
heartbeat thread, so the tables are guarded by a lock that is never held while loading or unloading arrays.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import mlx.core as mx

from mlx_backend.contract import FailedModel, LoadedModel, ModelEvent
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.residency.events import ResidencyEvents
from mlx_backend.engine.residency.memory import MemoryLedger
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.keep_alive import KeepAlive
from mlx_backend.registry import Fingerprint, ModelEntry, ModelRegistry

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
    kv_per_token: int = 0
    load_s: float = 0.0
    warmup_s: float | None = None

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
    """What the engine may use when no budget is set: the GPU's recommended working set where there is one,
    else half of physical memory (the OS and the gateway need the rest)."""
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


class LoadedModels:
    def __init__(self, registry: ModelRegistry, ledger: MemoryLedger, retry_backoff_s: float, keep_alive: KeepAlive,
                 events: ResidencyEvents) -> None:
        self.registry = registry
        self.ledger = ledger
        self.retry_backoff_s = retry_backoff_s
        self.keep_alive = keep_alive
        self._events = events
        self._models: dict[str, CachedModel] = {}
        self._failures: dict[str, _Failure] = {}
        self.pins: set[str] = set()
        self._lock = threading.Lock()
        self.loads = 0  # successful loads so far
        self.changes = 0  # bumped whenever the loaded or failed models change: worth a fresh heartbeat

    # -- which model ---------------------------------------------------------------------------------------

    def resolve(self, model_id: str, busy: Collection[str]) -> ModelEntry:
        """The model's entry on disk; raises EngineError (a loaded model that vanished is unloaded first)."""
        try:
            return self.registry.resolve(model_id)
        except EngineError:
            self.forget_failure(model_id)
            if model_id in self._models and model_id not in busy:
                log.info("model %s vanished from disk; unloading it", model_id)
                self.unload(model_id, "vanished")
            raise

    def current(self, entry: ModelEntry, busy: Collection[str]) -> CachedModel | None:
        """The loaded model of this entry, marked used now; None when it is not loaded, or its files changed
        (then it is unloaded, unless requests still use it)."""
        cached = self._models.get(entry.id)
        if cached is None:
            return None
        if cached.entry.fingerprint == entry.fingerprint or entry.id in busy:
            cached.last_used = time.monotonic()
            return cached
        log.info("the files of model %s changed; reloading it", entry.id)
        del cached  # let go, so the unload frees its arrays
        self.unload(entry.id, "changed")
        return None

    def holds(self, cached: CachedModel) -> bool:
        return self._models.get(cached.id) is cached

    def touch(self, model_id: str) -> None:
        """A request of the model ended: its keep-alive counts from now."""
        cached = self._models.get(model_id)
        if cached is not None:
            cached.last_used = time.monotonic()

    # -- in and out ----------------------------------------------------------------------------------------

    def add(self, entry: ModelEntry, artifacts: LoadedArtifacts, size: int, per_token: int, load_s: float,
            warmup_s: float | None) -> CachedModel:
        cached = CachedModel(entry, artifacts, size, time.time(), time.monotonic(), per_token, load_s, warmup_s)
        with self._lock:
            self._models[entry.id] = cached
        self.forget_failure(entry.id)
        self.ledger.add_model(entry.id, size, per_token)
        self.loads += 1
        self.changes += 1
        return cached

    def unload(self, model_id: str, reason: str) -> None:
        cached = self._models.get(model_id)
        if cached is None:
            return
        self.ledger.drop_prefix(model_id)
        self._events.model_dropped(model_id)  # the batcher lets go of its generator first
        with self._lock:
            self._models.pop(model_id, None)
        self.ledger.remove_model(model_id)
        self.changes += 1
        idle_s = time.monotonic() - cached.last_used
        del cached
        gc.collect()  # the model's arrays go now, not at some later collection
        mx.clear_cache()  # and MLX hands their buffers back instead of keeping them for reuse
        log.info("unloaded model %s (%s); MLX memory now %s active, %s cached", model_id, reason,
                 gb(mx.get_active_memory()), gb(mx.get_cache_memory()))
        self._events.model_event(ModelEvent(model_id, "unloaded", reason, round(idle_s, 3)))

    def clear(self) -> None:
        for model_id in list(self._models):
            self.unload(model_id, "shutdown")
        with self._lock:
            self._failures.clear()
        self.changes += 1

    # -- pins ----------------------------------------------------------------------------------------------

    def pin(self, model_id: str) -> None:
        self.pins.add(model_id)

    def unpin(self, model_id: str) -> None:
        """Back to the keep-alive rules, counted from now."""
        self.pins.discard(model_id)
        self.touch(model_id)
        self.changes += 1

    # -- room ----------------------------------------------------------------------------------------------

    def make_room(self, need: int, for_model: str, busy: Collection[str]) -> bool:
        """Free memory until `need` more bytes fit: the prefix cache first, then idle unpinned models, least
        recently used first. False when it will fit once running requests let go of what they hold (then
        nothing is freed yet); raises ENGINE_OVERLOADED when it cannot fit while the pinned models stay."""
        ledger = self.ledger
        if ledger.free >= need:
            return True
        idle = sorted((m.last_used, m.id, m.size_bytes) for m in self._models.values()
                      if m.id not in busy and m.id not in self.pins and m.id != for_model)
        if ledger.free + ledger.prefix_bytes + sum(size for _, _, size in idle) >= need:
            if ledger.prefix_bytes:
                ledger.trim_prefix(need - ledger.free)
            for _, victim, _ in idle:  # ids only: a reference held here would keep the victim's arrays alive
                if ledger.free >= need:
                    break
                log.info("evicting model %s (least recently used) to make room for %s", victim, for_model)
                self.unload(victim, "evicted")
            if ledger.free >= need:
                return True
        # What running requests hold comes back when they end: their KV cache, and their models' weights
        # once idle (unless pinned, or the very model this is for).
        held = ledger.kv_bytes() + sum(m.size_bytes for m in self._models.values()
                                       if m.id in busy and m.id not in self.pins and m.id != for_model)
        reclaimable = ledger.prefix_bytes + sum(size for _, _, size in idle)
        if ledger.free + reclaimable + held >= need and held:
            return False
        raise self.overloaded(for_model, need)

    def overloaded(self, model_id: str, need: int) -> EngineError:
        ledger = self.ledger
        pinned = sum(m.size_bytes for m in self._models.values() if m.id in self.pins)
        return EngineError(
            EngineErrorCode.ENGINE_OVERLOADED,
            f"The model '{model_id}' needs {gb(need)} more memory, but {gb(ledger.used)} of the "
            f"{gb(ledger.budget)} budget is held ({gb(pinned)} by pinned models, {gb(ledger.kv_bytes())} by "
            "running requests); retry shortly.",
        )

    def trim_overdraft(self) -> None:
        """Keep the prefix cache within what the budget leaves (it grows between the checks)."""
        if self.ledger.free < 0 and self.ledger.prefix_bytes:
            self.ledger.trim_prefix(-self.ledger.free)

    # -- keep-alive ----------------------------------------------------------------------------------------

    def _expires(self, cached: CachedModel, busy: Collection[str]) -> float | None:
        return self.keep_alive.expires_at(cached.id, cached.last_used, pinned=cached.id in self.pins,
                                          busy=cached.id in busy)

    def expire_idle(self, busy: Collection[str]) -> bool:
        """Unload the models whose keep-alive ran out; True when one was."""
        now = time.monotonic()
        due = [(m.id, now - m.last_used) for m in self._models.values()
               if (t := self._expires(m, busy)) is not None and t <= now]
        for model_id, unused_s in due:
            log.info("unloading model %s: unused for %.0fs (keep-alive %gs)", model_id, unused_s,
                     self.keep_alive.for_model(model_id))
            self.unload(model_id, "idle")
        return bool(due)

    def seconds_until_expiry(self, busy: Collection[str]) -> float | None:
        now = time.monotonic()
        due = [t for m in self._models.values() if (t := self._expires(m, busy)) is not None]
        return max(0.0, min(due) - now) if due else None

    # -- failures ------------------------------------------------------------------------------------------

    def raise_remembered(self, entry: ModelEntry) -> None:
        failure = self._failures.get(entry.id)
        if failure is None:
            return
        fresh = time.monotonic() - failure.failed_mono < self.retry_backoff_s
        if fresh and failure.fingerprint == entry.fingerprint:
            raise failure.error
        self.forget_failure(entry.id)

    def remember(self, entry: ModelEntry, error: EngineError) -> None:
        if error.code in _REMEMBERED:
            with self._lock:
                self._failures[entry.id] = _Failure(error, time.time(), time.monotonic(), entry.fingerprint)
            self.changes += 1

    def forget_failure(self, model_id: str) -> None:
        with self._lock:
            if self._failures.pop(model_id, None) is not None:
                self.changes += 1

    # -- the heartbeat -------------------------------------------------------------------------------------

    def snapshot(self, running: Mapping[str, int]) -> tuple[tuple[LoadedModel, ...], tuple[FailedModel, ...]]:
        now, wall = time.monotonic(), time.time()
        busy = {m for m, n in running.items() if n}
        with self._lock:
            loaded = tuple(
                LoadedModel(
                    m.id, m.size_bytes, m.loaded_at, running.get(m.id, 0),
                    last_used_at=round(wall - (now - m.last_used), 3),
                    expires_at=round(wall + (t - now), 3) if (t := self._expires(m, busy)) is not None else None,
                    pinned=m.id in self.pins, kv_bytes=self.ledger.kv_bytes(m.id),
                    load_s=round(m.load_s, 3), warmup_s=round(m.warmup_s, 3) if m.warmup_s is not None else None,
                )
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


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"
