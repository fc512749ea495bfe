"""Loads, one at a time, in the order asked for, in pieces between decode steps (mlx_backend/engine/model_load.py), and
whoever waits for them.

Every kind of waiter (a request, an operator's command, a prompt count, a start-up preload) is a `Waiter`
registered on the load it waits for, and hears the outcome once, the same way: its `deliver` is called with
the `LoadOutcome` when the load ends, loaded or failed. A waiter that goes away is forgotten (`forget`).
A model too large for the budget is refused before its weights are read (validation reads headers only).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mlx_backend.contract import LoadProgress, ModelEvent
from mlx_backend.engine import model_check, vision
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.model_load import Progress, StagedLoad
from mlx_backend.engine.residency.events import ResidencyEvents
from mlx_backend.engine.residency.memory import kv_bytes_per_token
from mlx_backend.engine.residency.models import CachedModel, LoadedModels, gb
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelEntry

log = logging.getLogger("mlx_gateway.engine.cache")

PIECE_S = 0.03  # a load's piece while other requests decode: about one decode step
IDLE_PIECE_S = 0.25  # with nothing else to do, bigger pieces (the inbox is still read between them)
READ_POLL_S = 0.05  # how long an otherwise idle engine waits on the loader thread before looking again
PROGRESS_LOG_S = 5.0  # a long load says how far it got this often

WaiterKind = Literal["request", "admin", "count", "preload"]


@dataclass(frozen=True)
class LoadOutcome:
    """How a load ended for its waiters: the model, or the error."""

    model_id: str
    model: CachedModel | None
    error: EngineError | None


@dataclass(frozen=True)
class Waiter:
    id: str  # the request id, the command's id, or the model id of a preload
    kind: WaiterKind
    deliver: Callable[[LoadOutcome], None]  # called once, when the load it waits for ends


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
    """A blocking load function seen as a Loader (tests and an engine group's ranks inject these)."""

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
    waiters: dict[str, Waiter] = field(default_factory=dict)  # waiter id -> waiter
    loader: Loader | None = None  # None while queued
    started: float = 0.0  # monotonic, once it runs
    started_at: float = 0.0  # unix

    @property
    def id(self) -> str:
        return self.entry.id

    def wait(self, waiter: Waiter) -> None:
        """Every waiter is registered here, whatever its kind; `LoadQueue._finish` delivers to each once."""
        self.waiters.setdefault(waiter.id, waiter)


@dataclass(frozen=True)
class LoadSettings:
    warmup: bool = True
    prefill_step_size: int = 2048
    read_delay_s: float = 0.0  # test-only (fault injection): a slow disk
    validate: Callable[[ModelEntry], int] | None = None  # None: mlx_backend.engine.model_check.validate
    load: Callable[[ModelEntry], LoadedArtifacts] | None = None  # None: staged loads (mlx_backend.engine.model_load)


class LoadQueue:
    def __init__(self, models: LoadedModels, settings: LoadSettings, events: ResidencyEvents) -> None:
        self._models = models
        self._settings = settings
        self._validate = settings.validate or model_check.validate
        self._events = events
        self._queue: deque[PendingLoad] = deque()  # the first one runs once it fits
        self.loading: str | None = None  # read by the heartbeat thread
        self._progress_logged = 0.0

    def __bool__(self) -> bool:
        return bool(self._queue)

    def find(self, model_id: str) -> PendingLoad | None:
        """The load of this model, queued or running."""
        for pending in self._queue:
            if pending.id == model_id:
                return pending
        return None

    def enqueue(self, entry: ModelEntry, reason: str) -> PendingLoad:
        """The load of this model, queued now if it is not already; validation (headers only) first, so a
        broken or too large model fails before anything waits for it."""
        pending = self.find(entry.id)
        if pending is not None:
            return pending
        self._models.raise_remembered(entry)
        budget = self._models.ledger.budget
        try:
            size = self._validate(entry)
            if size > budget:
                raise EngineError(
                    EngineErrorCode.MODEL_TOO_LARGE,
                    f"The model '{entry.id}' needs {gb(size)} of memory for its weights; the engine's memory "
                    f"budget is {gb(budget)}.",
                )
        except EngineError as exc:
            self._models.remember(entry, exc)
            raise
        pending = PendingLoad(entry, size, reason)
        self._queue.append(pending)
        return pending

    def forget(self, waiter_id: str) -> None:
        """A waiter went away (an aborted request): the load goes on, it is not told."""
        for pending in self._queue:
            pending.waiters.pop(waiter_id, None)

    # -- between decode steps ------------------------------------------------------------------------------

    def advance(self, busy: Collection[str], *, idle: bool, budget_s: float | None = None) -> bool:
        """Start the next queued load once it fits, or run a piece of the current one. True when it did MLX
        work (a piece)."""
        if not self._queue:
            return False
        pending = self._queue[0]
        if pending.loader is None and not self._start(pending, busy):
            return False
        assert pending.loader is not None
        self._log_progress(pending)
        try:
            artifacts = pending.loader.advance(budget_s if budget_s is not None else IDLE_PIECE_S if idle else PIECE_S)
        except EngineError as exc:
            self._finish(pending, None, exc)
            return True
        if artifacts is not None:
            self._finish(pending, artifacts, None)
        return True

    def seconds_until_due(self) -> float | None:
        """0: a load to start or run now; a short poll while it only reads on its thread; None: no load."""
        if not self._queue:
            return None
        loader = self._queue[0].loader
        return READ_POLL_S if loader is not None and loader.progress.stage == "reading" else 0.0

    def head(self) -> PendingLoad | None:
        return self._queue[0] if self._queue else None

    def give_up(self, pending: PendingLoad) -> EngineError:
        """Drop a load that waits for memory nothing will give back (a blocking `get`): ENGINE_OVERLOADED."""
        self._queue.remove(pending)
        return self._models.overloaded(pending.id, pending.size)

    def progress(self) -> tuple[LoadProgress | None, tuple[str, ...]]:
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
        self._models.ledger.loading = 0

    # -- inside --------------------------------------------------------------------------------------------

    def _start(self, pending: PendingLoad, busy: Collection[str]) -> bool:
        """Start the queued load once its weights fit; False while it waits for memory. A load that cannot
        fit while the memory stays held fails its waiters with ENGINE_OVERLOADED."""
        settings = self._settings
        try:
            if not self._models.make_room(pending.size, pending.id, busy):
                return False
            pending.loader = (
                _OneShot(settings.load, pending.entry, pending.size) if settings.load is not None
                # A vision model loads in one piece, through mlx-vlm (mlx_backend/engine/vision.py).
                else _OneShot(vision.load, pending.entry, pending.size) if vision.serves(pending.entry)
                else StagedLoad(pending.entry, pending.size, warmup=settings.warmup,
                                prefill_step_size=settings.prefill_step_size, read_delay_s=settings.read_delay_s)
            )
        except EngineError as exc:
            self._finish(pending, None, exc)
            return False
        pending.started, pending.started_at = time.monotonic(), time.time()
        self._models.ledger.loading = pending.size
        self.loading = pending.id
        log.info("loading model %s (%s, asked for by %s)", pending.id, gb(pending.size), pending.reason)
        return True

    def _finish(self, pending: PendingLoad, artifacts: LoadedArtifacts | None, error: EngineError | None) -> None:
        """The load ended: the model joins the loaded ones (or its failure is remembered), then every waiter
        hears the outcome."""
        self._queue.remove(pending)
        if pending.loader is not None:
            self.loading = None
            self._models.ledger.loading = 0
        cached = None
        if artifacts is not None:
            load_s = time.monotonic() - pending.started
            warmup_s = pending.loader.warmup_s if pending.loader is not None else None
            per_token = kv_bytes_per_token(artifacts.config, artifacts.float16_upcast)
            if per_token == 0:
                log.warning("model %s: its config does not give the KV cache's shape; its requests' KV cache is "
                            "not budgeted", pending.id)
            cached = self._models.add(pending.entry, artifacts, artifacts.size_bytes or pending.size, per_token,
                                      load_s, warmup_s)
            self._events.model_event(ModelEvent(
                pending.id, "loaded", pending.reason, round(load_s, 3), cached.size_bytes,
                round(warmup_s, 3) if warmup_s is not None else None))
        else:
            assert error is not None
            log.warning("loading model %s failed: %s", pending.id, error.message)
            self._models.remember(pending.entry, error)
            self._models.changes += 1
        outcome = LoadOutcome(pending.id, cached, error)
        for waiter in list(pending.waiters.values()):
            waiter.deliver(outcome)

    def _log_progress(self, pending: PendingLoad) -> None:
        now = time.monotonic()
        if now - max(pending.started, self._progress_logged) < PROGRESS_LOG_S or pending.loader is None:
            return
        self._progress_logged = now
        p = pending.loader.progress
        log.info("loading model %s: %s, %s of %s read, %s in memory, %.0fs so far", pending.id, p.stage,
                 gb(p.bytes_read), gb(p.bytes_total), gb(p.bytes_loaded), now - pending.started)
