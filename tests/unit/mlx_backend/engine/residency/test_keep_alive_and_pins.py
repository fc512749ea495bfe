"""Residency's rules, with a counting fake loader: loads asked for and answered later (every kind of waiter hears
the outcome once), idle unload by keep-alive, pins, the operator's commands, and the memory budget that includes
the KV cache and the prefix cache (trimmed by residency itself, no batcher involved)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlx_backend.engine.residency.load_queue import LoadOutcome, Waiter, WaiterKind
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.keep_alive import KeepAlive
from mlx_backend.registry import ModelRegistry
from tests.unit.mlx_backend.engine.residency.test_models import FakeLoader, Recorder, add_model


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, size in {"a": 100, "b": 100, "c": 100}.items():
        add_model(tmp_path, name, size)
    return tmp_path


class FakePrefix:
    """A prefix cache that gives back what is asked."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.trimmed: list[int] = []

    def trim(self, n_bytes: int) -> None:
        self.trimmed.append(n_bytes)
        self.nbytes = max(0, self.nbytes - n_bytes)

    def drop(self, model_id: str) -> None:
        return None


class Rig:
    def __init__(self, root: Path, budget: int = 250, keep_alive: KeepAlive | None = None) -> None:
        self.fake = FakeLoader()
        self.recorder = Recorder()
        self.cache = Residency(ModelRegistry([root], None, False), budget, 30.0, events=self.recorder,
                               keep_alive=keep_alive, validate=self.fake.validate, load=self.fake.load)
        self.events = self.recorder.events
        self.prefix = FakePrefix()
        self.cache.ledger.prefix = self.prefix
        self.trimmed = self.prefix.trimmed
        self.outcomes: list[tuple[str, str, EngineError | None]] = []  # (waiter, model, error), as delivered

    def wait(self, model_id: str, kind: WaiterKind = "admin", *, pin: bool = False) -> list[LoadOutcome]:
        """Wait for a model as `kind` does; the outcomes delivered at once (none while it loads)."""
        waiter_id = f"{kind}-{len(self.outcomes)}-{model_id}"
        now: list[LoadOutcome] = []

        def deliver(outcome: LoadOutcome) -> None:
            now.append(outcome)
            self.outcomes.append((waiter_id, outcome.model_id, outcome.error))

        self.cache.wait_for(model_id, Waiter(waiter_id, kind, deliver), set(), pin=pin)
        return list(now)

    @property
    def done(self) -> list[tuple[str, EngineError | None]]:
        return [(model_id, error) for _, model_id, error in self.outcomes]

    def load(self, model_id: str, busy: set[str] | None = None) -> None:
        """As the batcher does: ask, step, ask again."""
        assert self.cache.acquire(model_id, busy or set(), waiter="w") is None
        self.cache.advance(busy or set(), idle=True)
        assert self.cache.acquire(model_id, busy or set(), waiter="w") is not None

    def loaded(self) -> list[str]:
        return sorted(m.id for m in self.cache.report({}).loaded)


def test_a_load_is_answered_after_a_step_and_its_waiters_hear_its_failure(root: Path) -> None:
    (root / "b" / "broken").touch()
    rig = Rig(root)
    assert rig.cache.acquire("a", set(), waiter="r1") is None  # asked for, not loaded yet
    assert rig.cache.acquire("a", set(), waiter="r2") is None  # the same load, not a second one
    assert rig.wait("a", "count") == []  # a prompt count waits for the same load
    assert rig.cache.report({}).queued_loads == ("a",)  # queued, not started
    rig.cache.advance(set(), idle=True)
    assert rig.cache.acquire("a", set(), waiter="r1") is not None
    assert rig.fake.loads == ["a"]
    assert rig.done == [("a", None)]
    assert [(e.model, e.kind, e.reason) for e in rig.events] == [("a", "loaded", "request")]

    assert rig.cache.acquire("b", set(), waiter="r3") is None
    rig.cache.advance(set(), idle=True)
    with pytest.raises(EngineError) as info:
        rig.cache.acquire("b", set(), waiter="r3")
    assert info.value.code == EngineErrorCode.MODEL_LOAD_FAILED


def test_an_unused_model_unloads_when_its_keep_alive_runs_out(root: Path) -> None:
    rig = Rig(root, keep_alive=KeepAlive(0.2, (("b", -1.0),)))
    rig.load("a")
    rig.load("b")
    assert rig.cache.seconds_until_due(set()) == pytest.approx(0.2, abs=0.05)
    expires = {m.id: m.expires_at for m in rig.cache.report({}).loaded}
    assert expires["a"] == pytest.approx(time.time() + 0.2, abs=0.1) and expires["b"] is None
    rig.cache.advance({"a"}, idle=False)
    time.sleep(0.25)
    rig.cache.advance({"a"}, idle=False)  # busy: never unloaded under its requests
    assert rig.loaded() == ["a", "b"]
    rig.cache.models.touch("a")  # its last request ended now
    rig.cache.advance(set(), idle=True)
    assert rig.loaded() == ["a", "b"]
    time.sleep(0.25)
    rig.cache.advance(set(), idle=True)
    assert rig.loaded() == ["b"]  # b's keep-alive is -1
    assert [(e.model, e.kind, e.reason) for e in rig.events][-1] == ("a", "unloaded", "idle")
    assert rig.cache.ledger.weights_bytes == 100
    assert rig.cache.seconds_until_due(set()) is None  # nothing left to expire: sleep until a command


def test_keep_alive_zero_unloads_as_soon_as_the_last_request_ends(root: Path) -> None:
    rig = Rig(root, keep_alive=KeepAlive(0.0))
    rig.load("a")
    rig.cache.advance({"a"}, idle=False)
    assert rig.loaded() == ["a"]
    rig.cache.models.touch("a")
    rig.cache.advance(set(), idle=True)
    assert rig.loaded() == []


def test_a_pinned_model_is_never_idle_unloaded_or_evicted(root: Path) -> None:
    rig = Rig(root, keep_alive=KeepAlive(0.0, (("b", -1.0), ("c", -1.0))))  # a alone would go at once
    assert rig.wait("a", pin=True) == []
    rig.cache.advance(set(), idle=True)
    assert rig.done == [("a", None)]
    rig.cache.advance(set(), idle=True)
    assert rig.loaded() == ["a"]
    rig.load("b")  # 200 of 250 held; c needs 100: b is evicted, a stays
    rig.cache.advance({"b"}, idle=False)
    rig.load("c", busy=set())
    assert rig.loaded() == ["a", "c"]
    assert ("b", "unloaded", "evicted") in [(e.model, e.kind, e.reason) for e in rig.events]
    snapshot = {m.id: m for m in rig.cache.report({}).loaded}
    assert snapshot["a"].pinned and snapshot["a"].expires_at is None


def test_memory_held_by_pinned_models_is_an_overload_not_a_wait(root: Path) -> None:
    rig = Rig(root, budget=200)
    for model_id in ("a", "b"):
        rig.wait(model_id, pin=True)
        rig.cache.advance(set(), idle=True)
    assert rig.cache.acquire("c", set(), waiter="r") is None
    rig.cache.advance(set(), idle=True)
    with pytest.raises(EngineError) as info:
        rig.cache.acquire("c", set(), waiter="r")
    assert info.value.code == EngineErrorCode.ENGINE_OVERLOADED
    assert "pinned" in info.value.message
    rig.cache.unpin("b")
    rig.load("c")  # b is idle and unpinned now: evicted for c
    assert rig.loaded() == ["a", "c"]


def test_a_load_waits_while_running_requests_hold_the_memory(root: Path) -> None:
    rig = Rig(root, budget=250)
    rig.load("a")
    rig.load("b")
    assert rig.cache.acquire("c", {"a", "b"}, waiter="r") is None
    rig.cache.advance({"a", "b"}, idle=False)
    assert rig.cache.acquire("c", {"a", "b"}, waiter="r") is None  # waits: a and b serve requests
    assert rig.fake.loads == ["a", "b"]
    rig.cache.advance({"b"}, idle=False)  # a's requests ended: a is evicted, c loads
    assert rig.cache.acquire("c", {"b"}, waiter="r") is not None
    assert rig.loaded() == ["b", "c"]


def test_the_operator_loads_unloads_and_unpins(root: Path) -> None:
    rig = Rig(root)
    assert rig.wait("a") == []
    rig.cache.advance(set(), idle=True)
    assert [o.model is not None for o in rig.wait("a", pin=True)] == [True]  # already loaded: pinned at once
    assert "a" in rig.cache.models.pins
    with pytest.raises(EngineError) as info:
        rig.cache.unload("a", {"a"})
    assert info.value.code == EngineErrorCode.MODEL_BUSY
    rig.cache.unload("a", set())
    assert rig.loaded() == [] and "a" not in rig.cache.models.pins
    assert rig.events[-1].reason == "requested"
    rig.cache.unload("a", set())  # not loaded: nothing to do, no error
    (not_found,) = rig.wait("nope")  # told at once, the one way outcomes come
    assert not_found.error is not None and not_found.error.code == EngineErrorCode.MODEL_NOT_FOUND
    rig.wait("b")
    with pytest.raises(EngineError) as info:
        rig.cache.unload("b", set())  # still loading
    assert info.value.code == EngineErrorCode.MODEL_BUSY


def test_a_request_that_can_never_fit_is_refused_one_that_can_later_waits(root: Path) -> None:
    rig = Rig(root, budget=100 + 4 * 256 * 10)  # a's weights and room for 4 rows of 256 tokens at 10 B/token
    rig.load("a")
    rig.cache.ledger.add_model("a", 100, per_token=10)
    with pytest.raises(EngineError) as info:
        rig.cache.reserve_kv("big", "a", 5 * 256, set())
    assert info.value.code == EngineErrorCode.MEMORY_BUDGET_EXCEEDED
    assert info.value.param == "max_tokens" and "Lower max_tokens" in info.value.message
    with pytest.raises(EngineError):
        rig.cache.reserve_kv("many", "a", 256, set(), rows=5)  # n = 5 rows never fit either
    assert rig.cache.reserve_kv("r1", "a", 2 * 256, set())  # half the room
    assert not rig.cache.reserve_kv("r2", "a", 3 * 256, {"a"})  # 2 rows x 768 > the room: wait for r1
    rig.cache.request_done("r1", "a")
    assert rig.cache.reserve_kv("r2", "a", 3 * 256, set())
    assert rig.cache.ledger.kv_bytes() == 3 * 256 * 10


def test_room_comes_from_the_prefix_cache_first_then_idle_models(root: Path) -> None:
    rig = Rig(root, budget=100 + 100 + 256 * 10)
    rig.load("a")
    rig.load("b")
    rig.cache.ledger.add_model("a", 100, per_token=10)
    rig.prefix.nbytes = 1000
    assert rig.cache.reserve_kv("r", "a", 256, {"a"})  # 2560 needed, 1560 free: the prefix cache gives 1000
    assert rig.trimmed == [1000] and rig.loaded() == ["a", "b"]
    assert not rig.cache.reserve_kv("s", "a", 256, {"a"})  # a second row waits for r: b's 100 would not do
    assert rig.loaded() == ["a", "b"]  # and nothing is freed for a request that waits anyway


def test_room_for_a_kv_cache_comes_from_idle_models_too(root: Path) -> None:
    rig = Rig(root, budget=100 + 100 + 256 * 10 - 50)
    rig.load("a")
    rig.load("b")
    rig.cache.ledger.add_model("a", 100, per_token=10)
    assert rig.cache.reserve_kv("r", "a", 256, {"a"})
    assert rig.loaded() == ["a"] and rig.trimmed == []


def test_an_over_budget_prefix_cache_is_trimmed_between_steps(root: Path) -> None:
    rig = Rig(root, budget=250)
    rig.load("a")
    rig.prefix.nbytes = 300  # 100 + 300 > 250
    rig.cache.advance(set(), idle=True)
    assert rig.trimmed == [150]
    assert rig.cache.ledger.free == 0


def test_progress_of_the_load_in_progress_is_logged_every_few_seconds(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mlx_backend.engine.residency.load_queue as load_queue

    monkeypatch.setattr(load_queue, "PROGRESS_LOG_S", 0.0)
    rig = Rig(root)
    rig.cache.acquire("a", set())
    with caplog.at_level("INFO", logger="mlx_gateway.engine.cache"):
        rig.cache.advance(set(), idle=True)
    assert any("loading model a: loading, " in r.getMessage() and "read" in r.getMessage() for r in caplog.records)
