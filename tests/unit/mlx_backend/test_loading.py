"""A staged load on a real tiny model: its stages in order, reading on its own thread, the tensors evaluated a
few per piece, the warm-up, and failures that name their cause."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_backend import loader, loading
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.loading import StagedLoad
from mlx_backend.registry import ModelRegistry
from tests.support import tiny_models as tm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tm.make_tiny_model(root / "tiny", num_layers=4)
    return root


def staged(root: Path, name: str = "tiny", warmup: bool = False) -> StagedLoad:
    entry = ModelRegistry([root], None, False).resolve(name)
    return StagedLoad(entry, loader.validate(entry), warmup=warmup)


def drive(load: StagedLoad, budget_s: float = 0.0) -> tuple[list[str], int]:
    """Advance with the given piece budget until done; the stages seen and the number of pieces."""
    stages, pieces = [], 0
    while True:
        load.wait_reading(10)
        stages.append(load.stage)
        pieces += 1
        if load.advance(budget_s) is not None:
            return stages, pieces


def test_the_stages_in_order_and_one_tensor_per_piece_at_the_smallest_budget(models: Path) -> None:
    load = staged(models)
    stages, pieces = drive(load, budget_s=0.0)
    assert list(dict.fromkeys(stages)) == ["reading", "loading", "done"]  # (building is one piece's work)
    tensors = 3 + 4 * 9  # embeddings, final norm, (head tied) + per layer: 4 attention, 3 mlp, 2 norms
    assert pieces >= tensors  # a budget of 0 still does one piece: one tensor
    progress = load.progress
    assert progress.stage == "done"
    assert progress.bytes_read == progress.bytes_total == (models / "tiny" / "model.safetensors").stat().st_size
    assert progress.bytes_loaded == load.size


def test_a_generous_budget_takes_few_pieces_and_the_model_generates(models: Path) -> None:
    load = staged(models, warmup=True)
    _, pieces = drive(load, budget_s=10.0)
    assert pieces <= 6  # reading, building, all tensors, two warm-up tokens
    assert load.warmup_s is not None and load.warmup_s > 0
    artifacts = load.advance(0)  # done: asking again gives the same artifacts
    assert artifacts is not None
    logits = artifacts.model(mx.array([[1, 2, 3]]))
    assert logits.shape[-1] == artifacts.config["vocab_size"]


def test_the_files_are_read_on_the_loader_thread_not_the_caller(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader_threads: set[str] = set()
    gate = threading.Event()
    real_tokenizer = loader.load_tokenizer

    def slow_tokenizer(*args: object, **kwargs: object) -> object:
        reader_threads.add(threading.current_thread().name)
        gate.wait(10)
        return real_tokenizer(*args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(loader, "load_tokenizer", slow_tokenizer)
    load = staged(models)
    started = time.monotonic()
    for _ in range(20):
        assert load.advance(1.0) is None  # never blocks on the reading
        assert load.stage == "reading"
    assert time.monotonic() - started < 1.0
    gate.set()
    drive(load)
    assert reader_threads == {"load-tiny"}


def test_a_broken_tokenizer_fails_before_any_weight_is_read(models: Path, tmp_path: Path) -> None:
    folder = tm.copy_model(models / "tiny", tmp_path / "bad")
    (folder / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    load = staged(tmp_path, "bad")
    with pytest.raises(EngineError) as info:
        drive(load)
    assert info.value.code == EngineErrorCode.MODEL_LOAD_FAILED
    assert "tokenizer is broken" in info.value.message
    assert load.progress.bytes_read == 0


def test_mismatched_shapes_fail_while_loading_with_the_cause(models: Path, tmp_path: Path) -> None:
    tm.mismatch_shapes(tm.copy_model(models / "tiny", tmp_path / "odd"))
    with pytest.raises(EngineError) as info:
        drive(staged(tmp_path, "odd"))
    assert info.value.code == EngineErrorCode.MODEL_LOAD_FAILED
    assert "'odd'" in info.value.message and "shape" in info.value.message.lower()


def test_a_failing_warm_up_fails_the_load(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr("mlx_backend.solo.SoloGeneration.next_token", broken)
    with pytest.raises(EngineError) as info:
        drive(staged(models, warmup=True), budget_s=10.0)
    assert "warm-up generation failed (RuntimeError: no kernel for this)" in info.value.message


def test_cancel_stops_the_reading(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_READ_BLOCK", 1024)
    load = staged(models)
    load.cancel()
    load.wait_reading(10)
    assert load.progress.bytes_read < load.progress.bytes_total
