"""Model residency's one face: which models are in memory, loading them for whoever waits, and what holds the
memory budget (weights, the load in progress, the running requests' KV cache, the prefix cache).

The batcher asks for a request's model (`acquire`: None while it loads, ask again after the next step),
reserves its KV cache (`reserve_kv`) and gives it back (`request_done`); between decode steps it calls
`advance`, which runs a piece of the load in progress, unloads models whose keep-alive ran out and keeps the
prefix cache within the budget. Operators' commands, prompt counts and start-up preloads wait for a model with
`wait_for`; so do requests, inside `acquire`. Whatever waits hears the load's outcome once, the same way
(mlx_backend/engine/residency/load_queue.py). Residency calls out only through the `ResidencyEvents` it is
built with. Used by the MLX thread only; `report` may be called from the heartbeat thread.

The parts: load_queue.py (the loads and their waiters), models.py (the loaded models, failure memory, pins,
eviction and keep-alive over the ledger), memory.py (the ledger, which owns the prefix cache's bytes),
prefix.py (the prefix cache).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from mlx_backend.contract import FailedModel, LoadedModel, LoadProgress
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.residency.events import ResidencyEvents
from mlx_backend.engine.residency.load_queue import LoadOutcome, LoadQueue, LoadSettings, Waiter
from mlx_backend.engine.residency.memory import MemoryLedger, batch_kv_bytes
from mlx_backend.engine.residency.models import CachedModel, LoadedModels, default_memory_budget, gb
from mlx_backend.engine.residency.prefix import PrefixCaches
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.keep_alive import KeepAlive
from mlx_backend.registry import ModelEntry, ModelRegistry


@dataclass(frozen=True)
class ResidencyReport:
    """What the heartbeat says about models and memory."""

    loaded: tuple[LoadedModel, ...]
    failed: tuple[FailedModel, ...]
    loading: str | None
    load: LoadProgress | None
    queued_loads: tuple[str, ...]
    memory_budget_bytes: int
    weights_bytes: int  # loaded and loading
    kv_bytes: int


class Residency:
    def __init__(
        self,
        registry: ModelRegistry,
        memory_budget_bytes: int,
        retry_backoff_s: float,
        *,
        events: ResidencyEvents,
        prefix_cache_bytes: int = 0,
        keep_alive: KeepAlive | None = None,
        warmup: bool = True,
        prefill_step_size: int = 2048,
        read_delay_s: float = 0.0,
        validate: Callable[[ModelEntry], int] | None = None,
        load: Callable[[ModelEntry], LoadedArtifacts] | None = None,
    ) -> None:
        self.prefix = PrefixCaches(prefix_cache_bytes)
        budget = memory_budget_bytes if memory_budget_bytes > 0 else default_memory_budget()
        self.ledger = MemoryLedger(budget, self.prefix)
        self.models = LoadedModels(registry, self.ledger, retry_backoff_s, keep_alive or KeepAlive(), events)
        self.queue = LoadQueue(self.models, LoadSettings(warmup, prefill_step_size, read_delay_s, validate, load),
                               events)
        self._failed_waits: dict[str, EngineError] = {}  # request id -> why the load it waited for failed

    @property
    def budget(self) -> int:
        return self.ledger.budget

    @property
    def changes(self) -> int:
        """Bumped whenever the loaded or failed models change: worth a fresh heartbeat."""
        return self.models.changes

    # -- waiting for a model -------------------------------------------------------------------------------

    def wait_for(self, model_id: str, waiter: Waiter, busy: Collection[str], *, pin: bool = False) -> None:
        """Every kind of waiter's one way in: `waiter.deliver` is called once with the outcome, at once when the
        model is loaded or cannot be (not found, a remembered failure, too large), else when its load ends.
        `pin` pins it (an operator's pin, a pinned preload)."""
        operator = waiter.kind in ("admin", "preload")  # the heartbeat shows what an operator's load changed
        try:
            entry = self.models.resolve(model_id, busy)
            if pin:
                self.models.pin(model_id)
            cached = self.models.current(entry, busy)
            pending = None if cached is not None else self.queue.enqueue(entry, waiter.kind if operator else "request")
        except EngineError as exc:
            waiter.deliver(LoadOutcome(model_id, None, exc))
            return
        if operator:
            self.models.changes += 1
        if pending is None:
            waiter.deliver(LoadOutcome(model_id, cached, None))
        else:
            pending.wait(waiter)

    def acquire(self, model_id: str, busy: Collection[str] = (), waiter: str | None = None) -> CachedModel | None:
        """The loaded model for a request, or None while its load is queued or running (ask again after the
        next step): the request waits as a `Waiter` whose outcome, a failure, is raised here on the next ask.
        `busy` names models with requests in flight: they are never evicted or reloaded under those requests.
        Raises EngineError."""
        if waiter is not None and (error := self._failed_waits.pop(waiter, None)) is not None:
            raise error
        pending = self.queue.find(model_id)  # still loading: no need to look at the disk again
        if pending is None:
            entry = self.models.resolve(model_id, busy)
            cached = self.models.current(entry, busy)
            if cached is not None:
                return cached
            pending = self.queue.enqueue(entry, "request")
        if waiter is not None and waiter not in pending.waiters:
            pending.wait(Waiter(waiter, "request", self._request_outcome(waiter)))
        return None

    def _request_outcome(self, request_id: str) -> Callable[[LoadOutcome], None]:
        def deliver(outcome: LoadOutcome) -> None:
            if outcome.error is not None:  # a loaded model is found by the next `acquire`
                self._failed_waits[request_id] = outcome.error
        return deliver

    def forget_waiter(self, waiter: str) -> None:
        """A waiting request ended (started, failed or aborted): its model's load goes on, it is not told."""
        self._failed_waits.pop(waiter, None)
        self.queue.forget(waiter)

    def get(self, model_id: str, busy: Collection[str] = ()) -> CachedModel:
        """The loaded model, loading it now if needed (blocking: tests and tools; the engine uses `acquire`).
        Raises EngineError, ENGINE_OVERLOADED when the load would have to wait for memory."""
        waiter = f"get:{model_id}"
        cached = self.acquire(model_id, busy, waiter)
        while cached is None:
            head = self.queue.head()
            if head is not None and head.loader is not None:
                head.loader.wait_reading(3600)
            self.advance(busy, idle=True, budget_s=3600)
            cached = self.acquire(model_id, busy, waiter)
            if cached is None and head is not None and head.loader is None and self.queue.head() is head:
                self.forget_waiter(waiter)  # the load ahead waits for memory that nothing will give back
                raise self.queue.give_up(head)
        return cached

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
                f"This request may need {gb(batch_kv_bytes([tokens] * rows, per_token))} of KV cache ({tokens} "
                f"tokens of prompt and max_tokens{choices}, {per_token} bytes each); the memory budget leaves "
                f"{gb(max(0, room))} beside the model '{model_id}'. Lower max_tokens or shorten the prompt.",
                "max_tokens",
            )
        need = ledger.kv_increase(model_id, tokens, rows)
        if not self.models.make_room(need, model_id, {*busy, model_id}):
            return False
        ledger.reserve(request_id, model_id, tokens, rows)
        return True

    def request_done(self, request_id: str, model_id: str) -> None:
        """A request is over: its KV reservation goes back, and its model's keep-alive counts from now."""
        self.ledger.release(request_id)
        self.models.touch(model_id)

    # -- operators (the admin API) -------------------------------------------------------------------------

    def unload(self, model_id: str, busy: Collection[str]) -> None:
        """Unload now (and unpin). Raises MODEL_BUSY while it serves requests or loads."""
        if model_id in busy:
            raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model_id}' is serving requests; "
                              "unload it once they end.", "model")
        if self.queue.find(model_id) is not None:
            raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model_id}' is being loaded; unload it "
                              "once the load ends.", "model")
        self.models.pins.discard(model_id)
        self.models.unload(model_id, "requested")
        self.models.changes += 1

    def unpin(self, model_id: str) -> None:
        """Back to the keep-alive rules, counted from now. Raises MODEL_NOT_FOUND for an unknown id."""
        self.models.registry.resolve(model_id)  # an unknown id is a 404, as everywhere
        self.models.unpin(model_id)

    # -- between decode steps ------------------------------------------------------------------------------

    def advance(self, busy: Collection[str], *, idle: bool, budget_s: float | None = None) -> bool:
        """Unload models whose keep-alive ran out, keep the prefix cache within what the budget leaves, start
        the next queued load once it fits, run a piece of the current one. `idle`: no request is decoding, so
        pieces may be bigger. True when it did MLX work (a piece, an unload)."""
        worked = self.models.expire_idle(busy)
        self.models.trim_overdraft()
        return self.queue.advance(busy, idle=idle, budget_s=budget_s) or worked


    def seconds_until_due(self, busy: Collection[str]) -> float | None:
        """How long the MLX thread may sleep: until the next keep-alive runs out, or a short poll while a
        load is reading on its thread. 0: work to do now; None: nothing until a command comes."""
        if self.queue:
            return self.queue.seconds_until_due()
        return self.models.seconds_until_expiry(busy)

    def is_loading(self, model_id: str | None = None) -> bool:
        """The model's load is queued or running (no model: any load)."""
        return bool(self.queue) if model_id is None else self.queue.find(model_id) is not None

    # -- the heartbeat -------------------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        """The loaded models' weights (not the load in progress)."""
        return self.ledger.weights_bytes

    def report(self, running: Mapping[str, int]) -> ResidencyReport:
        """`running`: requests running per model."""
        loaded, failed = self.models.snapshot(running)
        load, queued = self.queue.progress()
        ledger = self.ledger
        return ResidencyReport(loaded, failed, self.queue.loading, load, queued, ledger.budget,
                               ledger.weights_bytes + ledger.loading, ledger.kv_bytes())

    def clear(self) -> None:
        """Cancel the loads, unload every model, forget the failures (shutdown)."""
        self.queue.clear()
        self.models.clear()
