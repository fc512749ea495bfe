"""An operator's commands on the MLX thread: a load is answered once its outcome is delivered (at once when the
model is loaded or cannot be, else when its load ends), after a heartbeat that shows it; unload and unpin are
answered at once; a start-up preload that fails is logged, never fatal."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_backend.contract import Event, Heartbeat, ModelControl, ModelControlDone
from mlx_backend.engine.control import Controls
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.registry import ModelRegistry
from tests.unit.mlx_backend.engine.residency.test_models import FakeLoader, Recorder, add_model


class Rig:
    def __init__(self, root: Path) -> None:
        fake = FakeLoader()
        self.residency = Residency(ModelRegistry([root], None, False), 1000, 30.0, events=Recorder(),
                                   validate=fake.validate, load=fake.load)
        self.sent: list[Event] = []
        self.controls = Controls(self.residency, self.sent.append, set, self.heartbeat)

    def heartbeat(self) -> Heartbeat:
        report = self.residency.report({})
        return Heartbeat(progress=0, running=0, waiting=0, loading=report.loading, loaded=report.loaded,
                         failed=report.failed, memory_budget_bytes=report.memory_budget_bytes,
                         active_memory_bytes=0, prompt_cache_bytes=0)

    def answer(self, request_id: str) -> tuple[Heartbeat, ModelControlDone]:
        """The one answer to a command, and the heartbeat sent right before it."""
        (index,) = [i for i, e in enumerate(self.sent)
                    if isinstance(e, ModelControlDone) and e.request_id == request_id]
        before = self.sent[index - 1]
        assert isinstance(before, Heartbeat)
        done = self.sent[index]
        assert isinstance(done, ModelControlDone)
        return before, done


@pytest.fixture
def root(tmp_path: Path) -> Path:
    add_model(tmp_path, "a", 100)
    (add_model(tmp_path, "broken", 100) / "broken").touch()
    return tmp_path


def test_a_load_is_answered_when_its_load_ends_after_a_heartbeat_showing_it(root: Path) -> None:
    rig = Rig(root)
    rig.controls.handle(ModelControl("c1", "pin", "a"))
    assert rig.sent == []  # loading: not answered yet
    rig.residency.advance(set(), idle=True)
    beat, done = rig.answer("c1")
    assert done.code is None and [(m.id, m.pinned) for m in beat.loaded] == [("a", True)]
    rig.controls.handle(ModelControl("c2", "load", "a"))  # loaded already: answered at once
    assert rig.answer("c2")[1].code is None


def test_a_failed_load_and_an_unknown_model_are_answered_with_their_errors(root: Path) -> None:
    rig = Rig(root)
    rig.controls.handle(ModelControl("c1", "load", "nope"))
    assert rig.answer("c1")[1].code == "model_not_found"
    rig.controls.handle(ModelControl("c2", "load", "broken"))
    rig.residency.advance(set(), idle=True)
    beat, done = rig.answer("c2")
    assert done.code == "model_load_failed" and [f.id for f in beat.failed] == ["broken"]


def test_unpin_and_unload_are_answered_at_once(root: Path) -> None:
    rig = Rig(root)
    rig.controls.handle(ModelControl("c1", "pin", "a"))
    rig.residency.advance(set(), idle=True)
    rig.controls.handle(ModelControl("c2", "unpin", "a"))
    assert [m.pinned for m in rig.answer("c2")[0].loaded] == [False]
    rig.controls.handle(ModelControl("c3", "unload", "a"))
    assert rig.answer("c3")[0].loaded == ()
    rig.controls.handle(ModelControl("c4", "unpin", "nope"))
    assert rig.answer("c4")[1].code == "model_not_found"


def test_a_preload_that_fails_is_logged_and_the_others_load(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(root)
    with caplog.at_level("ERROR", logger="mlx_gateway.engine.control"):
        rig.controls.preload(["broken", "nope"], pinned=["a"])
        rig.residency.advance(set(), idle=True)
        rig.residency.advance(set(), idle=True)
    assert [(m.id, m.pinned) for m in rig.residency.report({}).loaded] == [("a", True)]
    logged = sorted(r.getMessage().split(":")[0] for r in caplog.records)
    assert logged == ["cannot preload model broken", "cannot preload model nope"]
    assert rig.sent == []  # nobody to answer
