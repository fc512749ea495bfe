"""Residency's face: what it tells through the events it was built with (a model loaded or unloaded, and a model
let go of before its arrays are freed), and its report for the heartbeat."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_backend.contract import ModelEvent
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.keep_alive import KeepAlive
from mlx_backend.registry import ModelRegistry
from tests.unit.mlx_backend.engine.residency.test_models import FakeLoader, add_model


class InOrder:
    """ResidencyEvents that keeps every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (method, model, kind or "")

    def model_event(self, event: ModelEvent) -> None:
        self.calls.append(("model_event", event.model, event.kind))

    def model_dropped(self, model_id: str) -> None:
        self.calls.append(("model_dropped", model_id, ""))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        add_model(tmp_path, name, 100)
    return tmp_path


def test_the_events_it_was_built_with_hear_loads_and_unloads_dropped_first(root: Path) -> None:
    fake, events = FakeLoader(), InOrder()
    residency = Residency(ModelRegistry([root], None, False), 150, 30.0, events=events,
                          keep_alive=KeepAlive(-1.0), validate=fake.validate, load=fake.load)
    residency.get("a")
    residency.get("b")  # a is evicted for b
    residency.clear()
    assert events.calls == [
        ("model_event", "a", "loaded"),
        ("model_dropped", "a", ""), ("model_event", "a", "unloaded"),  # the batcher lets go before the arrays go
        ("model_event", "b", "loaded"),
        ("model_dropped", "b", ""), ("model_event", "b", "unloaded"),
    ]


def test_the_report_says_what_is_loaded_and_what_holds_the_budget(root: Path) -> None:
    fake = FakeLoader()
    residency = Residency(ModelRegistry([root], None, False), 1000, 30.0, events=InOrder(),
                          validate=fake.validate, load=fake.load)
    residency.get("a")
    assert residency.acquire("b", set(), waiter="r") is None
    report = residency.report({"a": 2})
    assert [(m.id, m.running) for m in report.loaded] == [("a", 2)]
    assert report.queued_loads == ("b",) and report.load is None and report.loading is None
    assert report.memory_budget_bytes == 1000 and report.weights_bytes == 100 == residency.weights_bytes
