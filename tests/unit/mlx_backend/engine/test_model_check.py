"""Validation before loading: every way a folder goes bad gives the right code, names the model and the
cause, is quick, and loads nothing."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from mlx_backend.engine import model_check, model_load
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelEntry, make_entry
from tests.support import tiny_models as tm

LOAD_FAILED = EngineErrorCode.MODEL_LOAD_FAILED
UNSUPPORTED = EngineErrorCode.MODEL_UNSUPPORTED


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.make_tiny_model(tmp_path_factory.mktemp("pristine") / "tiny")


@pytest.fixture
def model(pristine: Path, tmp_path: Path) -> Path:
    return tm.copy_model(pristine, tmp_path / "my-model")


def entry_for(folder: Path) -> ModelEntry:
    return make_entry("org/my-model", folder, "models_dir")


@pytest.fixture
def no_heavy_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights or tokenizer were loaded before validation failed")

    monkeypatch.setattr(model_check, "load_model", forbidden)
    monkeypatch.setattr(model_check, "load_tokenizer", forbidden)


CORRUPTIONS: list[tuple[str, Callable[[Path], object], EngineErrorCode, str]] = [
    ("no config", tm.remove_config, LOAD_FAILED, "config.json is missing"),
    ("invalid config", tm.write_invalid_config_json, LOAD_FAILED, "config.json is not valid JSON"),
    ("config is a list", lambda p: (p / "config.json").write_text("[1]"), LOAD_FAILED, "not a JSON object"),
    ("unknown model_type", tm.set_model_type, UNSUPPORTED, "model_type 'no_such_arch' is not supported"),
    ("odd model_type", lambda p: tm.set_model_type(p, "../../os"), UNSUPPORTED, "is not supported"),
    ("no model_type", lambda p: (p / "config.json").write_text("{}"), UNSUPPORTED, "has no model_type"),
    ("remote code", lambda p: _edit_config(p, model_file="evil.py"), UNSUPPORTED, "custom model code"),
    ("no weights", tm.remove_weights, LOAD_FAILED, "no weights"),
    ("truncated weights", tm.truncate_weights, LOAD_FAILED, "model.safetensors is truncated"),
    ("garbage header", tm.corrupt_safetensors_header, LOAD_FAILED, "corrupt header (not JSON)"),
    ("huge header", lambda p: tm.corrupt_safetensors_header(p, "huge_length"), LOAD_FAILED, "corrupt header"),
    ("tiny file", lambda p: (p / "model.safetensors").write_bytes(b"abc"), LOAD_FAILED, "truncated"),
    ("weights are a dir", tm.replace_weights_with_directory, LOAD_FAILED, "cannot be read"),
    ("dangling weights", tm.replace_weights_with_dangling_symlink, LOAD_FAILED, "cannot be read"),
    ("missing shard", lambda p: _index(p, "model-00002-of-00002.safetensors"), LOAD_FAILED,
     "shard model-00002-of-00002.safetensors is missing"),
    ("no tokenizer", tm.remove_tokenizer, LOAD_FAILED, "tokenizer is missing"),
    ("broken tokenizer", tm.break_tokenizer, LOAD_FAILED, "tokenizer.json is not valid JSON"),
    ("broken tokenizer config", lambda p: (p / "tokenizer_config.json").write_text("{"), LOAD_FAILED,
     "tokenizer_config.json is not valid JSON"),
]


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _index(path: Path, missing: str) -> None:
    weight_map = {"a": "model.safetensors", "b": missing}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("damage", "code", "cause"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
@pytest.mark.usefixtures("no_heavy_loading")
def test_corruption_is_caught_before_loading(
    model: Path, damage: Callable[[Path], object], code: EngineErrorCode, cause: str
) -> None:
    damage(model)
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        model_load.load(entry_for(model))
    assert time.monotonic() - started < 1.0
    assert info.value.code == code
    assert "The model 'org/my-model' cannot be loaded" in info.value.message
    assert cause in info.value.message


@pytest.mark.usefixtures("no_heavy_loading")
def test_weights_the_server_may_not_read_are_a_load_failure(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 000 does not stop root (the CI user), so the refusal the kernel would give is injected here.
    def refuse(file: Path, *args: Any, **kwargs: Any) -> IO[Any]:
        if Path(file).suffix == ".safetensors":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(model_check, "open", refuse, raising=False)
    with pytest.raises(EngineError) as info:
        model_load.load(entry_for(model))
    assert info.value.code == LOAD_FAILED
    assert "model.safetensors cannot be read (Permission denied)" in info.value.message


def test_mismatched_shapes_fail_at_load_with_the_cause(model: Path) -> None:
    tm.mismatch_shapes(model)
    model_check.validate(entry_for(model))  # the headers are fine: only loading can tell
    with pytest.raises(EngineError) as info:
        model_load.load(entry_for(model))
    assert info.value.code == LOAD_FAILED
    assert "'org/my-model'" in info.value.message
    assert "shape" in info.value.message.lower()


def test_tokenizer_that_parses_but_cannot_load(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["model"] = {"type": "NoSuchModel"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded although the tokenizer is broken")

    monkeypatch.setattr(model_check, "load_model", forbidden)
    with pytest.raises(EngineError) as info:
        model_load.load(entry_for(model))
    assert info.value.code == LOAD_FAILED
    assert "tokenizer is broken" in info.value.message


def test_good_model_loads_with_size_from_headers(model: Path) -> None:
    entry = entry_for(model)
    size = model_check.validate(entry)
    # float16 llama: embeddings (tied) + 2 layers; the headers' bytes, not the file size, held as float32 on
    # the CPU (twice the bytes: mlx_backend/engine/model_check.py, upcast_float16)
    assert 0 < size // 2 < (model / "model.safetensors").stat().st_size < size
    artifacts = model_load.load(entry)
    assert artifacts.size_bytes == size
    assert artifacts.context_length == 512
    assert artifacts.tokenizer.eos_token_ids
    assert artifacts.tokenizer.has_chat_template


def test_remapped_model_type_is_supported(model: Path) -> None:
    tm.set_model_type(model, "mistral")  # mlx-lm maps mistral onto llama
    assert model_check.validate(entry_for(model)) > 0


def test_model_without_chat_template_still_loads(model: Path) -> None:
    tm.remove_chat_template(model)
    assert not model_load.load(entry_for(model)).tokenizer.has_chat_template
