"""A staged load on a real tiny model: its stages in order, reading on its own thread, the tensors evaluated a
few per piece, the warm-up, and failures that name their cause."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.engine import masks, model_check, model_load
from mlx_backend.engine.model_load import StagedLoad
from mlx_backend.engine.residency.memory import kv_bytes_per_token, rounded_tokens
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.engine.solo import SoloGeneration
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry
from tests.support import tiny_models as tm
from tests.unit.mlx_backend.engine.residency.test_models import Recorder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tm.make_tiny_model(root / "tiny", num_layers=4)
    return root


def staged(root: Path, name: str = "tiny", warmup: bool = False) -> StagedLoad:
    entry = ModelRegistry([root], None, False).resolve(name)
    return StagedLoad(entry, model_check.validate(entry), warmup=warmup)


def file_tensor_bytes(path: Path) -> int:
    entry = ModelRegistry([path.parent], None, False).resolve(path.name)
    return sum(model_check._tensor_bytes(entry, f) for f in model_check.weight_files(entry))


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
    assert progress.bytes_loaded == file_tensor_bytes(models / "tiny")  # file bytes, as bytes_total counts


def test_the_warm_up_compiles_the_grammar_mask_unpack_and_a_failure_there_only_warns(
    models: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    unpacked: list[int] = []
    real = masks.unpacked_on_device

    def recorded(bitmask: np.ndarray, width: int, plain: np.ndarray | None = None) -> mx.array:
        unpacked.append(width)
        return real(bitmask, width, plain)

    monkeypatch.setattr(masks, "unpacked_on_device", recorded)
    drive(staged(models, warmup=True), budget_s=10.0)
    assert unpacked == [32]  # one mask unpacked on the device, once the warm-up generation is over

    def broken(bitmask: object, width: int, plain: object = None) -> mx.array:
        raise RuntimeError("no gather kernel here")

    monkeypatch.setattr(masks, "unpacked_on_device", broken)
    load = staged(models, warmup=True)
    drive(load, budget_s=10.0)
    assert load.progress.stage == "done" and load.advance(0) is not None  # the model still loads
    assert "no gather kernel here" in caplog.text


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
    real_tokenizer = model_check.load_tokenizer

    def slow_tokenizer(*args: object, **kwargs: object) -> object:
        reader_threads.add(threading.current_thread().name)
        gate.wait(10)
        return real_tokenizer(*args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(model_check, "load_tokenizer", slow_tokenizer)
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

    monkeypatch.setattr("mlx_backend.engine.solo.SoloGeneration.next_token", broken)
    with pytest.raises(EngineError) as info:
        drive(staged(models, warmup=True), budget_s=10.0)
    assert "warm-up generation failed (RuntimeError: no kernel for this)" in info.value.message


def test_cancel_stops_the_reading(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_load, "_READ_BLOCK", 1024)
    load = staged(models)
    load.cancel()
    load.wait_reading(10)
    assert load.progress.bytes_read < load.progress.bytes_total


# -- the dtype weights are computed in: float32 for float16 checkpoints on the CPU -----------------------------


def parameter_dtypes(model: object) -> set[mx.Dtype]:
    return {array.dtype for _, array in tree_flatten(model.parameters())}  # type: ignore[attr-defined]


def resident_bytes(model: object) -> int:
    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def dtype_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dtypes")
    for dtype in ("float16", "bfloat16", "float32"):
        tm.make_tiny_model(root / dtype, dtype=dtype)
    return root


def test_on_the_cpu_a_float16_model_is_held_and_computed_in_float32_and_the_budget_counts_it(
    dtype_models: Path,
) -> None:
    assert mx.default_device() == mx.cpu
    load = staged(dtype_models, "float16")
    artifacts = load.run()
    assert parameter_dtypes(artifacts.model) == {mx.float32}
    assert artifacts.float16_upcast
    held = resident_bytes(artifacts.model)
    assert held == 2 * file_tensor_bytes(dtype_models / "float16")
    assert load.size == artifacts.size_bytes == held  # what the ledger is told is what is held
    assert load.progress.bytes_loaded == file_tensor_bytes(dtype_models / "float16")
    # The activations, and so the KV cache, are float32 too.
    generation = SoloGeneration(artifacts.model, [5, 6, 7, 8], None, 0, greedy_sampler, None, 16)
    generation.next_token(more=True)
    keys = generation.prompt_cache[0].keys
    assert keys.dtype == mx.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_dtypes_stay_as_the_checkpoint_has_them(dtype_models: Path, dtype: str) -> None:
    artifacts = staged(dtype_models, dtype).run()
    assert parameter_dtypes(artifacts.model) == {getattr(mx, dtype)}
    assert artifacts.size_bytes == resident_bytes(artifacts.model) == file_tensor_bytes(dtype_models / dtype)


def test_a_device_that_does_not_upcast_keeps_float16(dtype_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU (here: the one function that decides, answering as on a GPU) keeps the checkpoint's float16."""
    monkeypatch.setattr(model_check, "upcasts_float16", lambda: False)
    load = staged(dtype_models, "float16")
    artifacts = load.run()
    assert parameter_dtypes(artifacts.model) == {mx.float16}
    assert not artifacts.float16_upcast
    assert artifacts.size_bytes == resident_bytes(artifacts.model) == file_tensor_bytes(dtype_models / "float16")


def test_the_ledger_counts_the_float32_weights_and_kv_cache_of_an_upcast_model(dtype_models: Path) -> None:
    cache = Residency(ModelRegistry([dtype_models], None, False), 1 << 30, 30.0, events=Recorder())
    model = cache.get("float16")
    assert cache.ledger.weights["float16"] == resident_bytes(model.artifacts.model)
    config = model.artifacts.config
    assert cache.ledger.per_token("float16") == kv_bytes_per_token(config) * 2  # float32 instead of float16
    generation = SoloGeneration(model.artifacts.model, list(range(5, 300)), None, 0, greedy_sampler, None, 512)
    generation.next_token(more=False)
    held = sum(c.keys.nbytes + c.values.nbytes for c in generation.prompt_cache)  # 512 slots: two KV steps
    assert held == rounded_tokens(295) * cache.ledger.per_token("float16")
