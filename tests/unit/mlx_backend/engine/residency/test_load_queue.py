"""The load queue's waiters: a request, an operator's command, a prompt count and a start-up preload all wait
for a load the same way and each hears its outcome exactly once, loaded or failed; a waiter that went away is
not told."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_backend.engine.residency.load_queue import LoadOutcome, Waiter, WaiterKind
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry
from tests.unit.mlx_backend.engine.residency.test_models import FakeLoader, Recorder, add_model

KINDS: tuple[WaiterKind, ...] = ("request", "admin", "count", "preload")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    add_model(tmp_path, "a", 100)
    (add_model(tmp_path, "broken", 100) / "broken").touch()
    return tmp_path


class Waiters:
    """One waiter of each kind; what each was told."""

    def __init__(self, residency: Residency) -> None:
        self.residency = residency
        self.told: dict[str, list[LoadOutcome]] = {}

    def wait(self, model_id: str, kind: WaiterKind) -> None:
        waiter_id = f"{kind}:{model_id}"
        told = self.told.setdefault(waiter_id, [])
        self.residency.wait_for(model_id, Waiter(waiter_id, kind, told.append), set())


def make(root: Path) -> tuple[Residency, FakeLoader]:
    fake = FakeLoader()
    residency = Residency(ModelRegistry([root], None, False), 1000, 30.0, events=Recorder(),
                          validate=fake.validate, load=fake.load)
    return residency, fake


def test_every_kind_of_waiter_hears_a_load_once(root: Path) -> None:
    residency, fake = make(root)
    waiters = Waiters(residency)
    for kind in KINDS:
        waiters.wait("a", kind)
    assert all(told == [] for told in waiters.told.values())  # nobody is told before the load ends
    assert residency.report({}).queued_loads == ("a",)  # one load for all of them
    residency.advance(set(), idle=True)
    residency.advance(set(), idle=True)  # nothing more is delivered
    assert fake.loads == ["a"]
    for kind in KINDS:
        (outcome,) = waiters.told[f"{kind}:a"]
        assert outcome.model_id == "a" and outcome.error is None
        assert outcome.model is not None and residency.models.holds(outcome.model)


def test_every_kind_of_waiter_hears_a_failure_once(root: Path) -> None:
    residency, _ = make(root)
    waiters = Waiters(residency)
    for kind in KINDS:
        waiters.wait("broken", kind)
    residency.advance(set(), idle=True)
    residency.advance(set(), idle=True)
    for kind in KINDS:
        (outcome,) = waiters.told[f"{kind}:broken"]
        assert outcome.model is None and outcome.error is not None
        assert outcome.error.code == EngineErrorCode.MODEL_LOAD_FAILED


def test_a_waiter_is_told_at_once_when_the_model_is_loaded_or_cannot_be(root: Path) -> None:
    residency, _ = make(root)
    residency.get("a")
    waiters = Waiters(residency)
    for kind in KINDS:
        waiters.wait("a", kind)
        waiters.wait("nope", kind)
    for kind in KINDS:
        ((loaded,), (missing,)) = waiters.told[f"{kind}:a"], waiters.told[f"{kind}:nope"]
        assert loaded.model is not None and loaded.error is None
        assert missing.error is not None and missing.error.code == EngineErrorCode.MODEL_NOT_FOUND


def test_a_waiter_that_went_away_is_not_told(root: Path) -> None:
    residency, _ = make(root)
    waiters = Waiters(residency)
    waiters.wait("broken", "count")
    waiters.wait("broken", "admin")
    residency.forget_waiter("count:broken")
    residency.advance(set(), idle=True)
    assert waiters.told["count:broken"] == []
    assert len(waiters.told["admin:broken"]) == 1


def test_a_request_hears_its_load_s_failure_on_its_next_ask(root: Path) -> None:
    """A request's way of being told: the batcher asks again after each step (`acquire`); the failure of the
    load it waited for is raised there, once."""
    residency, _ = make(root)
    assert residency.acquire("broken", set(), waiter="r1") is None
    residency.advance(set(), idle=True)
    with pytest.raises(EngineError) as info:
        residency.acquire("broken", set(), waiter="r1")
    assert info.value.code == EngineErrorCode.MODEL_LOAD_FAILED
    residency.forget_waiter("r1")
    with pytest.raises(EngineError) as again:  # now the remembered failure, as for anyone who asks
        residency.acquire("broken", set(), waiter="r1")
    assert again.value is info.value
