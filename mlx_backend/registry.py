"""Model ids -> model folders, offline. No MLX here: the gateway imports this to list and resolve models.

A model is a folder holding config.json or *.safetensors (a folder with weights but no config.json is
listed, so that using it says what is missing instead of "not found"). Three places are searched, in order:
  - each models dir: `<dir>/<name>` (id `name`) or one level of nesting `<dir>/<org>/<name>` (id `org/name`)
  - the Hugging Face cache: `models--org--name/snapshots/<rev>/` (id `org/name`), the revision `refs/main`
    points to, else the newest snapshot
  - the bundled demo model (id `mlx-gateway-demo`)
  - the bundled real model (id `smollm2-135m-instruct`), once `serve` has converted it (mlx_backend.smollm2)
An allow-list (ids or glob patterns), when set, hides every other model: it is "not found" and unlisted, as if
absent, so no request can make the engine load it.
An id never reaches the filesystem unchecked: `..`, absolute paths, backslashes, NUL and empty segments are
"not found", and so is a folder whose real path leaves the directory it was found in (a symlink out).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_backend.embedding_spec import is_embedding_model
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.keep_alive import matches

DEMO_MODEL_ID = "mlx-gateway-demo"  # same value as mlx_backend.demo.DEMO_MODEL_ID
BUNDLED_MODEL_ID = "smollm2-135m-instruct"  # same value as mlx_backend.smollm2.MODEL_ID

log = logging.getLogger("mlx_gateway.registry")

Source = Literal["models_dir", "hf_cache", "demo", "bundled"]

# config.json keys that give the context length, most specific first (names differ between architectures).
_CONTEXT_KEYS = (
    "max_position_embeddings", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length", "n_positions",
    "model_max_length",
)
# Files whose change means "a different model now": the fingerprint covers these.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_MAX_SEGMENT = 200

Fingerprint = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) per file


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path
    source: Source
    created: int  # unix mtime of the folder
    context_length: int | None
    size_bytes: int  # sum of *.safetensors sizes
    fingerprint: Fingerprint  # changes when config, weights or tokenizer files change
    kind: Literal["chat", "embedding"] = "chat"  # embedding: served by /v1/embeddings only (embedding_spec.py)
    vision: bool = False  # a vision-language model (`is_vision_config`): served through mlx-vlm when installed


def default_hf_cache_dir() -> Path:
    """huggingface_hub's cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def demo_model_folder() -> Path | None:
    """The bundled demo model's folder, or None when this install has none."""
    try:
        from mlx_backend.demo import demo_model_path
    except ImportError:
        return None
    try:
        return Path(demo_model_path())
    except Exception:  # a broken demo package must not break listing
        return None


def bundled_model_folder() -> Path | None:
    """The bundled real model's converted folder, or None when this machine has none (yet)."""
    try:
        from mlx_backend.smollm2 import converted_folder
    except ImportError:
        return None
    try:
        return converted_folder()
    except Exception:  # an unreadable cache must not break listing
        return None


def valid_segment(name: str) -> bool:
    """One path segment of an id: printable, no separators, not hidden, not `.`/`..`, valid UTF-8."""
    if not name or len(name) > _MAX_SEGMENT or name.startswith(".") or not name.isprintable():
        return False
    if any(c in name for c in "/\\\0"):
        return False
    try:
        name.encode("utf-8")  # os.listdir turns undecodable bytes into surrogates
    except UnicodeEncodeError:
        return False
    return True


def split_id(model_id: str) -> list[str] | None:
    """The id's segments (one or two), or None when it is not a safe id."""
    parts = model_id.split("/")
    if len(parts) > 2 or not all(valid_segment(p) for p in parts):
        return None
    return parts


def _inside(path: Path, root: Path) -> bool:
    """Whether path's real location is root's real location or below it (symlinks resolved)."""
    try:
        real, real_root = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real == real_root or real_root in real.parents


def _is_model_folder(path: Path) -> bool:
    try:
        if not path.is_dir():
            return False
        if (path / "config.json").is_file():
            return True
        return any(name.endswith(".safetensors") for name in os.listdir(path))
    except OSError:
        return False


def _subdirs(path: Path) -> Iterator[str]:
    """Names of the subfolders that could be id segments; unreadable folders give nothing."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return
    for name in names:
        if valid_segment(name):
            yield name


def _stat_files(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """The config, weight and tokenizer files of a folder with their stats (following HF cache symlinks)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json")) \
                or name in _TOKENIZER_FILES:
            try:
                yield name, (folder / name).stat()
            except OSError:
                continue


def fingerprint(folder: Path) -> Fingerprint:
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in _stat_files(folder))


def context_length_of(config: dict[str, Any]) -> int | None:
    for scope in (config, config.get("text_config")):
        if not isinstance(scope, dict):
            continue
        for key in _CONTEXT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def read_context_length(folder: Path) -> int | None:
    config = _read_config(folder)
    return context_length_of(config) if config is not None else None


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, absurdly nested
        return None
    return config if isinstance(config, dict) else None


def is_vision_config(config: dict[str, Any]) -> bool:
    """A vision-language checkpoint: its config has a vision tower (Qwen2/2.5/3-VL, Gemma 3, SmolVLM, Pixtral...)."""
    return isinstance(config.get("vision_config"), dict)


def make_entry(model_id: str, folder: Path, source: Source) -> ModelEntry:
    files = list(_stat_files(folder))
    try:
        created = int(folder.stat().st_mtime)
    except OSError:
        created = 0
    config = _read_config(folder)
    return ModelEntry(
        id=model_id,
        path=folder,
        source=source,
        created=created,
        context_length=context_length_of(config) if config is not None else None,
        size_bytes=sum(st.st_size for name, st in files if name.endswith(".safetensors")),
        fingerprint=tuple((name, st.st_size, st.st_mtime_ns) for name, st in files),
        kind="embedding" if is_embedding_model(folder) else "chat",
        vision=config is not None and is_vision_config(config),
    )


def _hf_id(repo_folder: str) -> str | None:
    """`models--org--name` -> `org/name` (None for other folders or unsafe names); one id per folder."""
    if not repo_folder.startswith("models--"):
        return None
    model_id = "/".join(repo_folder[len("models--"):].split("--", 1))
    return model_id if split_id(model_id) is not None else None


def _not_found(model_id: str) -> EngineError:
    shown = model_id if len(model_id) <= 200 else model_id[:200] + "..."
    return EngineError(
        EngineErrorCode.MODEL_NOT_FOUND,
        f"The model '{shown}' does not exist or is not available here. GET /v1/models lists the models.",
        param="model",
    )


class ModelRegistry:
    """Finds models on disk. `list()` is cached briefly (it reads every config.json); `resolve()` is always
    fresh and touches only the one folder it names."""

    def __init__(
        self,
        models_dirs: Sequence[Path | str],
        hf_cache_dir: Path | str | None,
        include_demo: bool,
        *,
        list_ttl_s: float = 2.0,
        allowed: Sequence[str] = (),
    ) -> None:
        self.models_dirs = tuple(Path(d).expanduser() for d in models_dirs)
        self.allowed = tuple(allowed)  # empty: every model found
        self.hf_cache_dir = Path(hf_cache_dir).expanduser() if hf_cache_dir is not None else None
        self.include_demo = include_demo
        self._list_ttl_s = list_ttl_s
        self._listed: tuple[float, tuple[int, ...], builtins.list[ModelEntry]] | None = None
        self._found: dict[str, tuple[float, tuple[int, ...], ModelEntry]] = {}  # resolve_recent's memory

    # -- resolve ---------------------------------------------------------------------------------------

    def allows(self, model_id: str) -> bool:
        return not self.allowed or any(matches(p, model_id) for p in self.allowed)

    def resolve(self, model_id: str) -> ModelEntry:
        """The entry for an id, or EngineError(MODEL_NOT_FOUND)."""
        if not isinstance(model_id, str) or (parts := split_id(model_id)) is None:
            raise _not_found(str(model_id))
        if not self.allows(model_id):
            raise _not_found(model_id)
        for root in self.models_dirs:
            folder = root.joinpath(*parts)
            # `org/name` only when `org` is not itself a model, as in the listing
            if len(parts) == 2 and _is_model_folder(root / parts[0]):
                continue
            if _is_model_folder(folder) and _inside(folder, root):
                return make_entry(model_id, folder, "models_dir")
        repo_folder = "models--" + "--".join(parts)
        if self.hf_cache_dir is not None and _hf_id(repo_folder) == model_id:
            hf_folder = self._hf_snapshot(self.hf_cache_dir, repo_folder)
            if hf_folder is not None:
                return make_entry(model_id, hf_folder, "hf_cache")
        if self.include_demo and model_id == DEMO_MODEL_ID:
            demo = demo_model_folder()
            if demo is not None and _is_model_folder(demo):
                return make_entry(model_id, demo, "demo")
        if self.include_demo and model_id == BUNDLED_MODEL_ID:
            bundled = bundled_model_folder()
            if bundled is not None and _is_model_folder(bundled):
                return make_entry(model_id, bundled, "bundled")
        raise _not_found(model_id)

    def resolve_recent(self, model_id: str) -> ModelEntry:
        """`resolve`, remembered as the listing is (list_ttl_s, while the roots' mtimes hold): the gateway's
        check of every request reads no folder (a resolve stats its files and parses config.json, ~0.4 ms).
        A model added or removed at the top of a root shows at once; an unknown id is never remembered."""
        stamp = self._roots_stamp()
        now = time.monotonic()
        found = self._found.get(model_id)
        if found is not None and now - found[0] < self._list_ttl_s and found[1] == stamp:
            return found[2]
        entry = self.resolve(model_id)
        self._found[model_id] = (now, stamp, entry)
        return entry

    @staticmethod
    def _hf_snapshot(cache: Path, repo_folder: str) -> Path | None:
        """The snapshot folder to serve for one cached repo: refs/main's revision, else the newest."""
        repo = cache / repo_folder
        snapshots = repo / "snapshots"
        candidates: list[Path] = []
        try:
            revision = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            revision = ""
        if valid_segment(revision):
            candidates.append(snapshots / revision)
        newest: list[tuple[float, str]] = []
        for name in _subdirs(snapshots):
            try:
                newest.append(((snapshots / name).stat().st_mtime, name))
            except OSError:
                continue
        candidates += [snapshots / name for _, name in sorted(newest, reverse=True)]
        for folder in candidates:
            # Files inside are symlinks into blobs/ (allowed); the snapshot folder itself must stay inside.
            if _is_model_folder(folder) and _inside(folder, cache):
                return folder
        return None

    # -- list ------------------------------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        """Every model found, first place wins on an id clash. Never raises on odd folders."""
        stamp = self._roots_stamp()
        now = time.monotonic()
        if self._listed is not None:
            listed_at, listed_stamp, entries = self._listed
            if now - listed_at < self._list_ttl_s and listed_stamp == stamp:
                return list(entries)
        entries = [e for e in self._scan() if self.allows(e.id)]
        self._listed = (now, stamp, entries)
        return list(entries)

    def _roots_stamp(self) -> tuple[int, ...]:
        """mtimes of the searched roots: a model folder added or removed at the top shows at once."""
        stamp = []
        for root in (*self.models_dirs, *([self.hf_cache_dir] if self.hf_cache_dir else [])):
            try:
                stamp.append(root.stat().st_mtime_ns)
            except OSError:
                stamp.append(-1)
        return tuple(stamp)

    def _scan(self) -> builtins.list[ModelEntry]:
        found: dict[str, ModelEntry] = {}

        def add(model_id: str, folder: Path, source: Source) -> None:
            if model_id in found:
                return
            try:
                found[model_id] = make_entry(model_id, folder, source)
            except Exception:  # vanished while we looked, or stranger: one odd folder never breaks a listing
                log.warning("skipping model folder %s", folder, exc_info=True)

        for root in self.models_dirs:
            for model_id, folder in self._scan_models_dir(root):
                add(model_id, folder, "models_dir")
        if self.hf_cache_dir is not None:
            for name in _subdirs(self.hf_cache_dir):
                hf_id = _hf_id(name)
                if hf_id is None or hf_id in found:
                    continue
                snapshot = self._hf_snapshot(self.hf_cache_dir, name)
                if snapshot is not None:
                    add(hf_id, snapshot, "hf_cache")
        if self.include_demo:
            demo = demo_model_folder()
            if demo is not None and _is_model_folder(demo):
                add(DEMO_MODEL_ID, demo, "demo")
            bundled = bundled_model_folder()
            if bundled is not None and _is_model_folder(bundled):
                add(BUNDLED_MODEL_ID, bundled, "bundled")
        return list(found.values())

    @staticmethod
    def _scan_models_dir(root: Path) -> Iterator[tuple[str, Path]]:
        for name in _subdirs(root):
            folder = root / name
            if _is_model_folder(folder):
                if _inside(folder, root):
                    yield name, folder
                continue
            try:
                if not folder.is_dir() or not _inside(folder, root):
                    continue
            except OSError:
                continue
            for inner in _subdirs(folder):  # one level of org/name nesting
                model_folder = folder / inner
                if _is_model_folder(model_folder) and _inside(model_folder, root):
                    yield f"{name}/{inner}", model_folder
