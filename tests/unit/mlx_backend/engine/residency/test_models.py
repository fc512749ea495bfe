"""The loaded models (through residency's face): LRU under a budget, too-large refusal before loading, failure
memory with backoff and fingerprint retry, reload when files change. Mostly with a counting fake loader; one test
loads for real."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from mlx_backend.contract import ModelEvent
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.residency.models import default_memory_budget
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelEntry, ModelRegistry
from tests.support import tiny_models as tm


class FakeLoader:
    """Sizes come from a `size` file in the folder; a `broken` file makes loading fail."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.validations: list[str] = []

    def validate(self, entry: ModelEntry) -> int:
        self.validations.append(entry.id)
        return int((entry.path / "size").read_text())

    def load(self, entry: ModelEntry) -> LoadedArtifacts:
        self.loads.append(entry.id)
        if (entry.path / "broken").exists():
            raise EngineError(EngineErrorCode.MODEL_LOAD_FAILED, f"The model '{entry.id}' is broken.")
        nothing: Any = object()
        return LoadedArtifacts(nothing, nothing, {}, self.validate(entry), None)


class Recorder:
    """The residency's events, kept: what the gateway would hear, and which models the batcher let go of."""

    def __init__(self) -> None:
        self.events: list[ModelEvent] = []
        self.dropped: list[str] = []

    def model_event(self, event: ModelEvent) -> None:
        self.events.append(event)

    def model_dropped(self, model_id: str) -> None:
        self.dropped.append(model_id)


def add_model(root: Path, name: str, size: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "size").write_text(str(size))
    (folder / "model.safetensors").write_bytes(b"0")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, size in {"a": 100, "b": 100, "c": 100, "big": 1000}.items():
        add_model(tmp_path, name, size)
    return tmp_path


def make_cache(
    root: Path, budget: int = 250, backoff: float = 30.0, load: Any = None
) -> tuple[Residency, FakeLoader, list[str]]:
    fake = FakeLoader()
    registry = ModelRegistry([root], None, False)
    events = Recorder()
    cache = Residency(registry, budget, backoff, events=events, validate=fake.validate, load=load or fake.load)
    return cache, fake, events.dropped


def code_of(cache: Residency, model_id: str, busy: set[str] | None = None) -> EngineErrorCode:
    with pytest.raises(EngineError) as info:
        cache.get(model_id, busy or set())
    return info.value.code


def test_repeated_gets_load_once(root: Path) -> None:
    cache, fake, _ = make_cache(root)
    first = cache.get("a")
    assert cache.get("a") is first
    assert cache.get("a") is first
    assert fake.loads == ["a"]
    assert cache.models.loads == 1


def test_lru_idle_model_is_evicted_to_fit(root: Path) -> None:
    cache, _, evicted = make_cache(root)
    cache.get("a")
    cache.get("b")
    cache.get("a")  # a is now the most recently used
    cache.get("c")
    assert evicted == ["b"]
    loaded, _ = cache.models.snapshot({})
    assert sorted(m.id for m in loaded) == ["a", "c"]
    assert cache.weights_bytes == 200


def test_busy_models_are_never_evicted(root: Path) -> None:
    cache, _, evicted = make_cache(root)
    cache.get("a")
    cache.get("b")
    assert code_of(cache, "c", {"a", "b"}) == EngineErrorCode.ENGINE_OVERLOADED
    cache.get("c", {"b"})
    assert evicted == ["a"]
    # an overload is not a property of the files: not remembered as a failure
    assert cache.models.snapshot({})[1] == ()


def test_too_large_is_refused_before_loading(root: Path) -> None:
    cache, fake, _ = make_cache(root, budget=500)
    cache.get("a")
    assert code_of(cache, "big") == EngineErrorCode.MODEL_TOO_LARGE
    assert fake.loads == ["a"]  # nothing evicted, nothing loaded
    _, failed = cache.models.snapshot({})
    assert [(f.id, f.code) for f in failed] == [("big", "model_too_large")]
    assert "budget" in failed[0].message


def test_failure_is_remembered_until_backoff(root: Path) -> None:
    (root / "a" / "broken").touch()
    cache, fake, _ = make_cache(root, backoff=0.3)
    assert code_of(cache, "a") == EngineErrorCode.MODEL_LOAD_FAILED
    assert code_of(cache, "a") == EngineErrorCode.MODEL_LOAD_FAILED
    assert fake.loads == ["a"]  # the second get did not retry
    _, failed = cache.models.snapshot({})
    assert 0 < failed[0].retry_after_s <= 0.3
    assert failed[0].failed_at == pytest.approx(time.time(), abs=5)
    time.sleep(0.35)
    (root / "a" / "broken").unlink()  # (not a fingerprinted file: only the backoff allows the retry)
    assert cache.get("a").id == "a"
    assert fake.loads == ["a", "a"]
    assert cache.models.snapshot({})[1] == ()


def test_changed_files_retry_at_once(root: Path) -> None:
    (root / "a" / "broken").touch()
    cache, fake, _ = make_cache(root, backoff=3600)
    assert code_of(cache, "a") == EngineErrorCode.MODEL_LOAD_FAILED
    (root / "a" / "broken").unlink()
    (root / "a" / "config.json").write_text(json.dumps({"model_type": "llama", "fixed": True}))
    assert cache.get("a").id == "a"
    assert fake.loads == ["a", "a"]


def test_loaded_model_whose_files_change_is_reloaded_when_idle(root: Path) -> None:
    cache, fake, evicted = make_cache(root)
    first = cache.get("a")
    (root / "a" / "model.safetensors").write_bytes(b"new weights")
    assert cache.get("a", {"a"}) is first  # busy: keep serving the loaded version
    second = cache.get("a")
    assert second is not first
    assert evicted == ["a"]
    assert fake.loads == ["a", "a"]


def test_deleted_model_is_unloaded_and_not_found(root: Path) -> None:
    cache, _, evicted = make_cache(root)
    cache.get("a")
    shutil.rmtree(root / "a")
    assert code_of(cache, "a", {"a"}) == EngineErrorCode.MODEL_NOT_FOUND
    assert evicted == []  # busy: its running requests keep their model
    assert code_of(cache, "a") == EngineErrorCode.MODEL_NOT_FOUND
    assert evicted == ["a"]
    assert cache.models.snapshot({})[0] == ()


def test_snapshot_reports_running_and_clear_frees_everything(root: Path) -> None:
    cache, _, evicted = make_cache(root)
    cache.get("a")
    cache.get("b")
    loaded, _ = cache.models.snapshot({"a": 3})
    assert {(m.id, m.running, m.size_bytes) for m in loaded} == {("a", 3, 100), ("b", 0, 100)}
    cache.clear()
    assert cache.models.snapshot({}) == ((), ())
    assert sorted(evicted) == ["a", "b"]


def test_loading_is_visible_while_it_happens(root: Path) -> None:
    seen: list[Any] = []
    spied = FakeLoader()

    def spying_load(entry: ModelEntry) -> LoadedArtifacts:
        seen.append(cache.report({}).loading)
        return spied.load(entry)

    cache, _, _ = make_cache(root, load=spying_load)
    cache.get("a")
    assert seen == ["a"]
    assert cache.report({}).loading is None


def test_default_budget_is_half_of_ram_on_cpu() -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert default_memory_budget() == int(ram * 0.5)
    cache = Residency(ModelRegistry([], None, False), 0, 1.0, events=Recorder())
    assert cache.budget == default_memory_budget()


def test_real_load_and_real_budget(tmp_path: Path) -> None:
    tm.make_tiny_model(tmp_path / "tiny")
    registry = ModelRegistry([tmp_path], None, False)
    cache = Residency(registry, 1 << 30, 30.0, events=Recorder())
    model = cache.get("tiny")
    assert model.size_bytes > 0
    assert cache.get("tiny") is model
    small = Residency(registry, 1000, 30.0, events=Recorder())
    with pytest.raises(EngineError) as info:
        small.get("tiny")
    assert info.value.code == EngineErrorCode.MODEL_TOO_LARGE
    assert "'tiny'" in info.value.message
