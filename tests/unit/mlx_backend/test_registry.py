"""Offline model discovery: ids, nesting, the Hugging Face cache layout, and every way out of a models dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry, default_hf_cache_dir


def make_model(folder: Path, context: int | None = 256, weights: int = 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"model_type": "llama"}
    if context is not None:
        config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def make_hf_repo(cache: Path, repo: str, revisions: list[str], main: str | None) -> Path:
    base = cache / ("models--" + repo.replace("/", "--"))
    blob = base / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_text(json.dumps({"model_type": "llama", "n_ctx": 128}))
    for rev in revisions:
        snap = base / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "config.json").symlink_to(Path("..") / ".." / "blobs" / "abc")
    if main is not None:
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(main)
    return base


def ids(registry: ModelRegistry) -> list[str]:
    return sorted(e.id for e in registry.list())


def not_found(registry: ModelRegistry, model_id: str) -> None:
    with pytest.raises(EngineError) as info:
        registry.resolve(model_id)
    assert info.value.code == EngineErrorCode.MODEL_NOT_FOUND
    assert info.value.param == "model"


def test_flat_and_nested_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "tiny", context=300, weights=10)
    make_model(root / "mlx-community" / "Llama-3-8B")
    (root / "mlx-community" / "README.md").parent.mkdir(exist_ok=True)
    (root / "mlx-community" / "README.md").write_text("hi")
    (root / "empty").mkdir()
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    assert ids(registry) == ["mlx-community/Llama-3-8B", "tiny"]
    entry = registry.resolve("tiny")
    assert entry.source == "models_dir"
    assert entry.path == root / "tiny"
    assert entry.context_length == 300
    assert entry.size_bytes == 10
    assert entry.created == int((root / "tiny").stat().st_mtime)
    assert registry.resolve("mlx-community/Llama-3-8B").path == root / "mlx-community" / "Llama-3-8B"
    not_found(registry, "empty")
    not_found(registry, "mlx-community")
    not_found(registry, "missing")


def test_weights_without_config_are_still_a_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "weights-only").mkdir(parents=True)
    (root / "weights-only" / "model.safetensors").write_bytes(b"\0" * 5)
    (root / "org" / "name").mkdir(parents=True)
    (root / "org" / "name" / "notes.txt").write_text("not a model")
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    assert ids(registry) == ["weights-only"]
    entry = registry.resolve("weights-only")
    assert (entry.context_length, entry.size_bytes) == (None, 5)
    not_found(registry, "org/name")


def test_no_deeper_nesting_and_no_nesting_inside_a_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "a" / "b" / "c")
    make_model(root / "m")
    make_model(root / "m" / "inner")
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    assert ids(registry) == ["m"]
    not_found(registry, "a/b/c")
    not_found(registry, "m/inner")


def test_context_length_keys(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name, config in {
        "a": {"n_ctx": 11}, "b": {"max_seq_len": 12}, "c": {"text_config": {"max_position_embeddings": 13}},
        "d": {"max_position_embeddings": "big"}, "e": {}, "f": {"max_position_embeddings": True},
    }.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "g").mkdir()
    (root / "g" / "config.json").write_text("{not json")
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    got = {e.id: e.context_length for e in registry.list()}
    assert got == {"a": 11, "b": 12, "c": 13, "d": None, "e": None, "f": None, "g": None}


def test_first_models_dir_wins(tmp_path: Path) -> None:
    make_model(tmp_path / "one" / "x", context=1)
    make_model(tmp_path / "two" / "x", context=2)
    make_model(tmp_path / "two" / "y", context=3)
    registry = ModelRegistry([tmp_path / "one", tmp_path / "two", tmp_path / "missing"], None, False)
    assert ids(registry) == ["x", "y"]
    assert registry.resolve("x").context_length == 1


@pytest.mark.parametrize(
    "model_id",
    [
        "..", "../secret", "a/../../secret", "/etc", "/abs/path", "a\\b", "..\\x", "a\0b", "", "/", "a/",
        "/a", "a//b", "a/b/c", ".", "./x", ".hidden", "x" * 300, "a\nb",
    ],
)
def test_unsafe_ids_are_not_found(tmp_path: Path, model_id: str) -> None:
    root = tmp_path / "models"
    make_model(tmp_path / "secret")
    make_model(root / "a")
    make_model(root / ".hidden")
    registry = ModelRegistry([root], tmp_path, False)
    not_found(registry, model_id)


def test_symlink_out_of_models_dir_is_not_found(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    outside = make_model(tmp_path / "outside" / "m")
    (root / "link").symlink_to(outside)
    (root / "org").symlink_to(tmp_path / "outside")  # nesting through a link out
    inside = make_model(root / "real")
    (root / "alias").symlink_to(inside)  # a link that stays inside is fine
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    not_found(registry, "link")
    not_found(registry, "org/m")
    assert registry.resolve("alias").path == root / "alias"
    assert ids(registry) == ["alias", "real"]


def test_models_dir_itself_may_be_a_symlink(tmp_path: Path) -> None:
    make_model(tmp_path / "real" / "m")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    registry = ModelRegistry([tmp_path / "link"], None, False, list_ttl_s=0)
    assert registry.resolve("m").path == tmp_path / "link" / "m"
    assert ids(registry) == ["m"]


def test_weird_folders_never_break_listing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    (root / "file-not-folder").write_text("x")
    (root / "broken-link").symlink_to(tmp_path / "nowhere")
    (root / "loop").symlink_to(root / "loop")
    (root / "config-is-dir").mkdir()
    (root / "config-is-dir" / "config.json").mkdir()
    locked = make_model(root / "locked" / "inner")
    os.chmod(locked.parent, 0)
    bad_name = os.fsencode(root) + b"/bad-\xff-name"
    os.makedirs(bad_name)
    open(bad_name + b"/config.json", "w").close()
    try:
        registry = ModelRegistry([root, tmp_path / "does-not-exist", root / "file-not-folder"], None, False)
        names = ids(registry)
        assert "good" in names
        assert all(n.encode("utf-8") for n in names)
        assert not any("bad" in n or "loop" in n or "config-is-dir" in n for n in names)
    finally:
        os.chmod(locked.parent, 0o755)


def test_hf_cache_layout_uses_refs_main(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    make_hf_repo(cache, "org/name", ["aaa", "bbb"], main="aaa")
    make_hf_repo(cache, "gpt2", ["ccc"], main=None)
    (cache / "models--incomplete" / "snapshots").mkdir(parents=True)
    (cache / "datasets--org--data").mkdir()
    (cache / ".locks").mkdir()
    registry = ModelRegistry([], cache, False, list_ttl_s=0)
    assert ids(registry) == ["gpt2", "org/name"]
    entry = registry.resolve("org/name")
    assert entry.source == "hf_cache"
    assert entry.path == cache / "models--org--name" / "snapshots" / "aaa"
    assert entry.context_length == 128  # config.json is a symlink into blobs/: allowed
    assert registry.resolve("gpt2").path.name == "ccc"
    not_found(registry, "org--name")  # one id per folder
    not_found(registry, "incomplete")
    not_found(registry, "org/data")


def test_hf_cache_newest_snapshot_when_ref_is_missing_or_bad(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    base = make_hf_repo(cache, "org/name", ["old", "new"], main="../../../etc")
    os.utime(base / "snapshots" / "old", (1, 1))
    registry = ModelRegistry([], cache, False)
    assert registry.resolve("org/name").path.name == "new"


def test_hf_snapshot_linking_out_of_the_cache_is_not_found(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    outside = make_model(tmp_path / "outside")
    base = cache / "models--org--evil" / "snapshots"
    base.mkdir(parents=True)
    (base / "rev").symlink_to(outside)
    registry = ModelRegistry([], cache, False, list_ttl_s=0)
    not_found(registry, "org/evil")
    assert ids(registry) == []


def test_models_dir_wins_over_hf_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    make_hf_repo(cache, "org/name", ["aaa"], main="aaa")
    make_model(tmp_path / "models" / "org" / "name")
    registry = ModelRegistry([tmp_path / "models"], cache, False, list_ttl_s=0)
    assert registry.resolve("org/name").source == "models_dir"
    assert [e.source for e in registry.list()] == ["models_dir"]


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "models" / "m")
    registry = ModelRegistry([tmp_path / "models"], None, False)
    before = registry.resolve("m").fingerprint
    assert {name for name, _, _ in before} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert registry.resolve("m").fingerprint == before
    (folder / "model.safetensors").write_bytes(b"\0" * 7)
    assert registry.resolve("m").fingerprint != before
    (folder / "README.md").write_text("docs do not matter")
    after = registry.resolve("m").fingerprint
    os.utime(folder / "README.md", (5, 5))
    assert registry.resolve("m").fingerprint == after


def test_listing_is_cached_but_sees_new_folders(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "a")
    registry = ModelRegistry([root], None, False, list_ttl_s=60)
    assert ids(registry) == ["a"]
    make_model(root / "b")  # changes the root's mtime: seen at once
    assert ids(registry) == ["a", "b"]
    (root / "b" / "config.json").unlink()  # deep change: cached until the ttl passes
    (root / "b" / "model.safetensors").unlink()
    assert ids(registry) == ["a", "b"]
    not_found(registry, "b")  # resolve is always fresh


def test_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = make_model(tmp_path / "demo")
    monkeypatch.setattr("mlx_backend.registry.demo_model_folder", lambda: demo)
    monkeypatch.setattr("mlx_backend.registry.bundled_model_folder", lambda: None)  # not converted on this machine
    registry = ModelRegistry([], None, True, list_ttl_s=0)
    assert ids(registry) == ["mlx-gateway-demo"]
    assert registry.resolve("mlx-gateway-demo").source == "demo"
    not_found(ModelRegistry([], None, False), "mlx-gateway-demo")


def test_the_bundled_real_model_is_offered_with_the_demo_once_converted(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    demo, bundled = make_model(tmp_path / "demo"), make_model(tmp_path / "cache" / "smollm2-135m-instruct")
    monkeypatch.setattr("mlx_backend.registry.demo_model_folder", lambda: demo)
    monkeypatch.setattr("mlx_backend.registry.bundled_model_folder", lambda: bundled)
    registry = ModelRegistry([], None, True, list_ttl_s=0)
    assert sorted(ids(registry)) == ["mlx-gateway-demo", "smollm2-135m-instruct"]
    entry = registry.resolve("smollm2-135m-instruct")
    assert (entry.source, entry.path) == ("bundled", bundled)
    not_found(ModelRegistry([], None, False), "smollm2-135m-instruct")


def test_the_bundled_model_folder_is_the_converted_one_in_the_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_backend import registry, smollm2

    monkeypatch.setenv("MLX_GATEWAY_CACHE_DIR", str(tmp_path))
    assert registry.bundled_model_folder() is None  # nothing converted yet
    folder = make_model(smollm2.model_folder())
    assert folder == tmp_path / "smollm2" / f"v{smollm2.CONVERSION_VERSION}-{smollm2.default_dtype()}" / \
        "smollm2-135m-instruct"
    assert registry.bundled_model_folder() == folder


def test_default_hf_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "x"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert default_hf_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert default_hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    assert default_hf_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"


def test_registry_does_not_import_mlx() -> None:
    import subprocess
    import sys

    code = "import sys, mlx_backend.registry; sys.exit('mlx' in sys.modules or 'mlx.core' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_resolve_recent_remembers_a_found_model_for_the_listing_ttl(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = make_model(root / "tiny")
    registry = ModelRegistry([root], None, False, list_ttl_s=60)
    assert registry.resolve_recent("tiny").path == folder
    (folder / "config.json").write_text("not json")  # inside the folder: the roots' mtimes hold
    assert registry.resolve_recent("tiny").context_length == 256  # remembered, no folder read
    assert registry.resolve("tiny").context_length is None  # resolve itself always reads


def test_resolve_recent_sees_a_model_removed_or_added_at_once(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "tiny")
    registry = ModelRegistry([root], None, False, list_ttl_s=60)
    registry.resolve_recent("tiny")
    (root / "tiny").rename(tmp_path / "elsewhere")  # the root's mtime changes
    with pytest.raises(EngineError) as info:
        registry.resolve_recent("tiny")
    assert info.value.code is EngineErrorCode.MODEL_NOT_FOUND
    make_model(root / "tiny")  # an unknown id was not remembered either
    assert registry.resolve_recent("tiny").path == root / "tiny"


def test_resolve_recent_reads_again_after_the_ttl(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = make_model(root / "tiny")
    registry = ModelRegistry([root], None, False, list_ttl_s=0)
    registry.resolve_recent("tiny")
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 99}))
    assert registry.resolve_recent("tiny").context_length == 99
