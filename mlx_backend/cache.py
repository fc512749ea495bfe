"""Loaded models within a memory budget that counts everything: weights, the load in progress, the running
requests' KV cache and the prefix cache (mlx_backend/memory.py).

Loads happen in pieces between decode steps (mlx_backend/engine/model_load.py), one at a time, in the order asked for:
`acquire` answers None while a request's model is queued or loading, and the batcher asks again after the
next step; `advance` runs the next piece. Room is made by trimming the prefix cache (it is only a cache),
then by evicting idle, unpinned models, least recently used first; what running requests hold is waited
for; what pinned models hold is never taken. An unused model unloads when its keep-alive runs out
(mlx_backend/residency.py); a pinned one never does.

A model too large for the budget is refused before its weights are read. A failure is re-raised as it was,
without a new attempt, until `retry_backoff_s` passes or the model's files change (a user fixing a broken
folder should not have to wait). A loaded model whose files changed or vanished is reloaded, or fails
cleanly, on its next use. Used by the MLX thread only; `snapshot()` may be called from the heartbeat thread,
so the tables are guarded by a lock that is never held while loading.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from mlx_backend.contract import FailedModel, LoadedModel, LoadProgress, ModelEvent
from mlx_backend.engine import model_check, vision
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.model_load import Progress, StagedLoad
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.memory import MemoryLedger, batch_kv_bytes, kv_bytes_per_token
from mlx_backend.registry import Fingerprint, ModelEntry, ModelRegistry
from mlx_backend.residency import KeepAlive

log = logging.getLogger("mlx_gateway.engine.cache")

# Failures that come from the files themselves: retrying before they change would fail the same way.
_REMEMBERED = {
    EngineErrorCode.MODEL_LOAD_FAILED, EngineErrorCode.MODEL_UNSUPPORTED, EngineErrorCode.MODEL_TOO_LARGE,
}
PIECE_S = 0.03  # a load's piece while other requests decode: about one decode step
IDLE_PIECE_S = 0.25  # with nothing else to do, bigger pieces (the inbox is still read between them)
READ_POLL_S = 0.05  # how long an otherwise idle engine waits on the loader thread before looking again
PROGRESS_LOG_S = 5.0  # a long load says how far it got this often


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


class Loader(Protocol):
    """One load in progress: mlx_backend.engine.model_load.StagedLoad, or a one-shot stand-in in tests."""

    @property
    def progress(self) -> Progress: ...
    @property
    def warmup_s(self) -> float | None: ...
    def advance(self, budget_s: float) -> LoadedArtifacts | None: ...
    def wait_reading(self, timeout_s: float) -> None: ...
    def cancel(self) -> None: ...


class _OneShot:
    """A blocking load function seen as a Loader (tests inject these)."""

    warmup_s = None

    def __init__(self, load: Callable[[ModelEntry], LoadedArtifacts], entry: ModelEntry, size: int) -> None:
        self._load, self._entry, self._size = load, entry, size

    @property
    def progress(self) -> Progress:
        return Progress("loading", 0, 0, self._size)

    def advance(self, budget_s: float) -> LoadedArtifacts:
        return self._load(self._entry)

    def wait_reading(self, timeout_s: float) -> None:
        return None

    def cancel(self) -> None:
        return None


@dataclass
class PendingLoad:
    entry: ModelEntry
    size: int
    reason: str  # request | admin | preload
    waiters: set[str] = field(default_factory=set)  # request ids waiting for it
    loader: Loader | None = None  # None while queued
    started: float = 0.0  # monotonic, once it runs
    started_at: float = 0.0  # unix

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


class ModelCache:
    def __init__(
        self,
        registry: ModelRegistry,
        memory_budget_bytes: int,
        retry_backoff_s: float,
        *,
        keep_alive: KeepAlive | None = None,
        warmup: bool = True,
        prefill_step_size: int = 2048,
        read_delay_s: float = 0.0,
        validate: Callable[[ModelEntry], int] = model_check.validate,
        load: Callable[[ModelEntry], LoadedArtifacts] | None = None,
    ) -> None:
        self.registry = registry
        self.ledger = MemoryLedger(memory_budget_bytes if memory_budget_bytes > 0 else default_memory_budget())
        self.retry_backoff_s = retry_backoff_s
        self.keep_alive = keep_alive or KeepAlive()
        self.warmup = warmup
        self.prefill_step_size = prefill_step_size
        self.read_delay_s = read_delay_s  # test-only (fault injection): a slow disk
        self._validate = validate
        self._load = load  # None: staged loads (mlx_backend.engine.model_load)
        self._models: dict[str, CachedModel] = {}
        self._failures: dict[str, _Failure] = {}
        self._queue: deque[PendingLoad] = deque()  # the first one runs once it fits
        self._waiter_errors: dict[str, EngineError] = {}  # request id -> why the load it waited for failed
        self.pins: set[str] = set()
        self._lock = threading.Lock()
        self.loading: str | None = None  # read by the heartbeat thread
        self._progress_logged = 0.0
        self.loads = 0  # successful loads so far
        self.changes = 0  # bumped whenever the loaded or failed models change: worth a fresh heartbeat
        # Set by the batcher and the worker; all run on the MLX thread.
        self.on_evict: Callable[[str], None] = lambda model_id: None  # the batcher drops its state first
        self.trim_prefix: Callable[[int], None] = lambda n_bytes: None  # free this many prefix-cache bytes
        self.on_load_done: Callable[[str, EngineError | None], None] = lambda model_id, error: None
        self.on_event: Callable[[ModelEvent], None] = lambda event: None

    @property
    def budget(self) -> int:
        return self.ledger.budget

    # -- requests ----------------------------------------------------------------------------------------

    def acquire(self, model_id: str, busy: Collection[str] = (), waiter: str | None = None) -> CachedModel | None:
        """The loaded model for a request, or None while its load is queued or running (ask again after the
        next step). `busy` names models with requests in flight: they are never evicted or reloaded under
        those requests. Raises EngineError, also the failure of the load `waiter` was waiting for."""
        if waiter is not None and (error := self._waiter_errors.pop(waiter, None)) is not None:
            raise error
        for pending in self._queue:  # still loading: no need to look at the disk again
            if pending.id == model_id:
                if waiter is not None:
                    pending.waiters.add(waiter)
                return None
        entry = self._resolve(model_id, busy)
        cached = self._models.get(model_id)
        if cached is not None:
            if cached.entry.fingerprint == entry.fingerprint or model_id in busy:
                cached.last_used = time.monotonic()
                return cached
            log.info("the files of model %s changed; reloading it", model_id)
            cached = None  # let go, so the unload frees its arrays
            self._unload(model_id, "changed")
        pending = self._enqueue(entry, "request")
        if waiter is not None:
            pending.waiters.add(waiter)
        return None

    def forget_waiter(self, waiter: str) -> None:
        """A waiting request ended (aborted): its model's load goes on, nobody is told about it."""
        self._waiter_errors.pop(waiter, None)
        for pending in self._queue:
            pending.waiters.discard(waiter)

    def touch(self, model_id: str) -> None:
        """A request of the model ended: its keep-alive counts from now."""
        cached = self._models.get(model_id)
        if cached is not None:
            cached.last_used = time.monotonic()

    def get(self, model_id: str, busy: Collection[str] = ()) -> CachedModel:
        """The loaded model, loading it now if needed (blocking: tests and tools; the engine uses `acquire`).
        Raises EngineError, ENGINE_OVERLOADED when the load would have to wait for memory."""
        waiter = f"get:{model_id}"
        cached = self.acquire(model_id, busy, waiter)
        if cached is not None:
            return cached
        while True:
            head = self._queue[0] if self._queue else None
            if head is not None and head.loader is not None:
                head.loader.wait_reading(3600)
            self.advance(busy, idle=True, budget_s=3600)
            cached = self.acquire(model_id, busy, waiter)
            if cached is not None:
                return cached
            if head is not None and head.loader is None and self._queue and self._queue[0] is head:
                self.forget_waiter(waiter)
                self._queue.remove(head)
                raise self._overloaded(head.id, head.size)

    # -- the KV cache of requests --------------------------------------------------------------------------

    def reserve_kv(self, request_id: str, model_id: str, tokens: int, busy: Collection[str], rows: int = 1) -> bool:
        """Reserve the KV cache a request may reach (`tokens` = prompt + max_tokens, in each of its `rows`
        choices) in its model's batch. False: it fits once running requests end (ask again). Raises
        MEMORY_BUDGET_EXCEEDED when it could never fit beside its model, ENGINE_OVERLOADED when what holds
        the memory will not let go of it."""
        ledger = self.ledger
        per_token = ledger.per_token(model_id)
        if ledger.alone_bytes(model_id, tokens, rows) > ledger.budget:
            room = ledger.budget - ledger.weights.get(model_id, 0)
            choices = f" in each of {rows} choices" if rows > 1 else ""
            raise EngineError(
                EngineErrorCode.MEMORY_BUDGET_EXCEEDED,
                f"This request may need {_gb(batch_kv_bytes([tokens] * rows, per_token))} of KV cache ({tokens} "
                f"tokens of prompt and max_tokens{choices}, {per_token} bytes each); the memory budget leaves "
                f"{_gb(max(0, room))} beside the model '{model_id}'. Lower max_tokens or shorten the prompt.",
                "max_tokens",
            )
        need = ledger.kv_increase(model_id, tokens, rows)
        if not self._make_room(need, model_id, {*busy, model_id}):
            return False
        ledger.reserve(request_id, model_id, tokens, rows)
        return True

    def release_kv(self, request_id: str) -> None:
        self.ledger.release(request_id)

    # -- operators (the admin API) -------------------------------------------------------------------------

    def request_load(self, model_id: str, busy: Collection[str], *, pin: bool = False,
                     reason: str = "admin") -> CachedModel | None:
        """Load a model now (queued behind loads already asked for); the model when it is already loaded,
        else None and `on_load_done` says when. Raises EngineError (not found, a remembered failure...)."""
        entry = self._resolve(model_id, busy)
        if pin:
            self.pins.add(model_id)
        cached = self._models.get(model_id)
        if cached is not None and (cached.entry.fingerprint == entry.fingerprint or model_id in busy):
            cached.last_used = time.monotonic()
            self.changes += 1
            return cached
        if cached is not None:
            cached = None  # let go, so the unload frees its arrays
            self._unload(model_id, "changed")
        self._enqueue(entry, reason)
        self.changes += 1
        return None

    def unload(self, model_id: str, busy: Collection[str]) -> None:
        """Unload now (and unpin). Raises MODEL_BUSY while it serves requests or loads."""
        if model_id in busy:
            raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model_id}' is serving requests; "
                              "unload it once they end.", "model")
        if any(p.id == model_id for p in self._queue):
            raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model_id}' is being loaded; unload it "
                              "once the load ends.", "model")
        self.pins.discard(model_id)
        if model_id in self._models:
            self._unload(model_id, "requested")
        self.changes += 1

    def unpin(self, model_id: str) -> None:
        """Back to the keep-alive rules, counted from now."""
        self.pins.discard(model_id)
        self.touch(model_id)
        self.changes += 1

    # -- between decode steps ------------------------------------------------------------------------------

    def advance(self, busy: Collection[str], *, idle: bool, budget_s: float | None = None) -> bool:
        """Start the next queued load once it fits, run a piece of the current one, unload models whose
        keep-alive ran out, keep the prefix cache within what the budget leaves. `idle`: no request is
        decoding, so pieces may be bigger. True when it did MLX work (a piece, an unload)."""
        worked = self._expire_idle(busy)
        if self.ledger.free < 0 and self.ledger.prefix_bytes:
            self.trim_prefix(-self.ledger.free)
        if not self._queue:
            return worked
        pending = self._queue[0]
        if pending.loader is None and not self._start(pending, busy):
            return worked
        assert pending.loader is not None
        self._log_progress(pending)
        try:
            artifacts = pending.loader.advance(budget_s if budget_s is not None else IDLE_PIECE_S if idle else PIECE_S)
        except EngineError as exc:
            self._finish_load(pending, None, exc)
            return True
        if artifacts is not None:
            self._finish_load(pending, artifacts, None)
        return True

    def seconds_until_due(self, busy: Collection[str]) -> float | None:
        """How long the MLX thread may sleep: until the next keep-alive runs out, or a short poll while a
        load is reading on its thread. 0: work to do now; None: nothing until a command comes."""
        if self._queue:  # a load to start or run; while it only reads on its thread, look again shortly
            loader = self._queue[0].loader
            return READ_POLL_S if loader is not None and loader.progress.stage == "reading" else 0.0
        now = time.monotonic()
        due = [t for m in self._models.values() if (t := self._expires(m, busy)) is not None]
        return max(0.0, min(due) - now) if due else None

    @property
    def has_load_work(self) -> bool:
        return bool(self._queue)

    def is_loading(self, model_id: str) -> bool:
        """Queued or loading."""
        return any(p.id == model_id for p in self._queue)

    # -- the heartbeat ---------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.ledger.weights_bytes

    def holds(self, cached: CachedModel) -> bool:
        return self._models.get(cached.id) is cached

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

    def load_progress(self) -> tuple[LoadProgress | None, tuple[str, ...]]:
        """The running load's progress, and the ids of the loads queued behind it (or waiting for memory)."""
        queue = list(self._queue)
        if not queue:
            return None, ()
        head, wall, now = queue[0], time.time(), time.monotonic()
        if head.loader is None:
            return None, tuple(p.id for p in queue)
        p = head.loader.progress
        started_at = round(wall - (now - head.started), 3)
        return (LoadProgress(head.id, p.stage, p.bytes_read, p.bytes_loaded, p.bytes_total, started_at, head.reason),
                tuple(q.id for q in queue[1:]))

    def clear(self) -> None:
        for pending in self._queue:
            if pending.loader is not None:
                pending.loader.cancel()
        self._queue.clear()
        self.loading = None
        self.ledger.loading = 0
        for model_id in list(self._models):
            self._unload(model_id, "shutdown")
        with self._lock:
            self._failures.clear()
        self.changes += 1

    # -- inside ----------------------------------------------------------------------------------------

    def _resolve(self, model_id: str, busy: Collection[str]) -> ModelEntry:
        try:
            return self.registry.resolve(model_id)
        except EngineError:
            self._forget_failure(model_id)
            if model_id in self._models and model_id not in busy:
                log.info("model %s vanished from disk; unloading it", model_id)
                self._unload(model_id, "vanished")
            raise

    def _enqueue(self, entry: ModelEntry, reason: str) -> PendingLoad:
        """The load of this model, queued now if it is not already; validation (headers only) first, so a
        broken or too large model fails before anything waits for it."""
        for pending in self._queue:
            if pending.id == entry.id:
                return pending
        self._raise_remembered(entry)
        try:
            size = self._validate(entry)
            if size > self.budget:
                raise EngineError(
                    EngineErrorCode.MODEL_TOO_LARGE,
                    f"The model '{entry.id}' needs {_gb(size)} of memory for its weights; the engine's memory "
                    f"budget is {_gb(self.budget)}.",
                )
        except EngineError as exc:
            self._remember(entry, exc)
            raise
        pending = PendingLoad(entry, size, reason)
        self._queue.append(pending)
        return pending

    def _start(self, pending: PendingLoad, busy: Collection[str]) -> bool:
        """Start the queued load once its weights fit; False while it waits for memory. A load that cannot
        fit while the memory stays held fails its waiters with ENGINE_OVERLOADED."""
        try:
            if not self._make_room(pending.size, pending.id, busy):
                return False
            pending.loader = (
                _OneShot(self._load, pending.entry, pending.size) if self._load is not None
                # A vision model loads in one piece, through mlx-vlm (mlx_backend/engine/vision.py).
                else _OneShot(vision.load, pending.entry, pending.size) if vision.serves(pending.entry)
                else StagedLoad(pending.entry, pending.size, warmup=self.warmup,
                                prefill_step_size=self.prefill_step_size, read_delay_s=self.read_delay_s)
            )
        except EngineError as exc:
            self._finish_load(pending, None, exc)
            return False
        pending.started, pending.started_at = time.monotonic(), time.time()
        self.ledger.loading = pending.size
        self.loading = pending.id
        log.info("loading model %s (%s, asked for by %s)", pending.id, _gb(pending.size), pending.reason)
        return True

    def _finish_load(self, pending: PendingLoad, artifacts: LoadedArtifacts | None, error: EngineError | None) -> None:
        self._queue.remove(pending)
        if pending.loader is not None:
            self.loading = None
            self.ledger.loading = 0
        if artifacts is not None:
            load_s = time.monotonic() - pending.started
            warmup_s = pending.loader.warmup_s if pending.loader is not None else None
            per_token = kv_bytes_per_token(artifacts.config, artifacts.float16_upcast)
            if per_token == 0:
                log.warning("model %s: its config does not give the KV cache's shape; its requests' KV cache is "
                            "not budgeted", pending.id)
            cached = CachedModel(pending.entry, artifacts, artifacts.size_bytes or pending.size, time.time(),
                                 time.monotonic(), per_token, load_s, warmup_s)
            with self._lock:
                self._models[pending.id] = cached
            self._forget_failure(pending.id)
            self.ledger.add_model(pending.id, cached.size_bytes, per_token)
            self.loads += 1
            self.on_event(ModelEvent(pending.id, "loaded", pending.reason, round(load_s, 3), cached.size_bytes,
                                     round(warmup_s, 3) if warmup_s is not None else None))
        else:
            assert error is not None
            log.warning("loading model %s failed: %s", pending.id, error.message)
            self._remember(pending.entry, error)
            for waiter in pending.waiters:
                self._waiter_errors[waiter] = error
        self.changes += 1
        self.on_load_done(pending.id, error)

    def _log_progress(self, pending: PendingLoad) -> None:
        now = time.monotonic()
        if now - max(pending.started, self._progress_logged) < PROGRESS_LOG_S or pending.loader is None:
            return
        self._progress_logged = now
        p = pending.loader.progress
        log.info("loading model %s: %s, %s of %s read, %s in memory, %.0fs so far", pending.id, p.stage,
                 _gb(p.bytes_read), _gb(p.bytes_total), _gb(p.bytes_loaded), now - pending.started)

    def _make_room(self, need: int, for_model: str, busy: Collection[str]) -> bool:
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
                self.trim_prefix(need - ledger.free)
            for _, victim, _ in idle:  # ids only: a reference held here would keep the victim's arrays alive
                if ledger.free >= need:
                    break
                log.info("evicting model %s (least recently used) to make room for %s", victim, for_model)
                self._unload(victim, "evicted")
            if ledger.free >= need:
                return True
        # What running requests hold comes back when they end: their KV cache, and their models' weights
        # once idle (unless pinned, or the very model this is for).
        held = ledger.kv_bytes() + sum(m.size_bytes for m in self._models.values()
                                       if m.id in busy and m.id not in self.pins and m.id != for_model)
        reclaimable = ledger.prefix_bytes + sum(size for _, _, size in idle)
        if ledger.free + reclaimable + held >= need and held:
            return False
        raise self._overloaded(for_model, need)

    def _overloaded(self, model_id: str, need: int) -> EngineError:
        ledger = self.ledger
        pinned = sum(m.size_bytes for m in self._models.values() if m.id in self.pins)
        return EngineError(
            EngineErrorCode.ENGINE_OVERLOADED,
            f"The model '{model_id}' needs {_gb(need)} more memory, but {_gb(ledger.used)} of the "
            f"{_gb(ledger.budget)} budget is held ({_gb(pinned)} by pinned models, {_gb(ledger.kv_bytes())} by "
            "running requests); retry shortly.",
        )

    def _expires(self, cached: CachedModel, busy: Collection[str]) -> float | None:
        return self.keep_alive.expires_at(cached.id, cached.last_used, pinned=cached.id in self.pins,
                                          busy=cached.id in busy)

    def _expire_idle(self, busy: Collection[str]) -> bool:
        now = time.monotonic()
        due = [(m.id, now - m.last_used) for m in self._models.values()
               if (t := self._expires(m, busy)) is not None and t <= now]
        for model_id, unused_s in due:
            log.info("unloading model %s: unused for %.0fs (keep-alive %gs)", model_id, unused_s,
                     self.keep_alive.for_model(model_id))
            self._unload(model_id, "idle")
        return bool(due)

    def _unload(self, model_id: str, reason: str) -> None:
        cached = self._models.get(model_id)
        if cached is None:
            return
        self.on_evict(model_id)  # the batcher lets go of its generator and prefix cache first
        with self._lock:
            self._models.pop(model_id, None)
        self.ledger.remove_model(model_id)
        self.changes += 1
        idle_s = time.monotonic() - cached.last_used
        del cached
        gc.collect()  # the model's arrays go now, not at some later collection
        mx.clear_cache()  # and MLX hands their buffers back instead of keeping them for reuse
        log.info("unloaded model %s (%s); MLX memory now %s active, %s cached", model_id, reason,
                 _gb(mx.get_active_memory()), _gb(mx.get_cache_memory()))
        self.on_event(ModelEvent(model_id, "unloaded", reason, round(idle_s, 3)))

    def _raise_remembered(self, entry: ModelEntry) -> None:
        failure = self._failures.get(entry.id)
        if failure is None:
            return
        fresh = time.monotonic() - failure.failed_mono < self.retry_backoff_s
        if fresh and failure.fingerprint == entry.fingerprint:
            raise failure.error
        self._forget_failure(entry.id)

    def _remember(self, entry: ModelEntry, error: EngineError) -> None:
        if error.code in _REMEMBERED:
            with self._lock:
                self._failures[entry.id] = _Failure(error, time.time(), time.monotonic(), entry.fingerprint)
            self.changes += 1

    def _forget_failure(self, model_id: str) -> None:
        with self._lock:
            if self._failures.pop(model_id, None) is not None:
                self.changes += 1


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"
