"""Wire types of the models on this machine: OpenAI's `Model` (with our residency extras), the list, and the
admin API's command body (its answers are `Model`s)."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class ModelAction(Struct, forbid_unknown_fields=True):
    """The model an admin command acts on: an id as `GET /v1/models` lists it (`org/name` included)."""

    model: str


class ModelError(Struct):
    code: str
    message: str
    retry_after_s: float


class LoadProgress(Struct):
    """A model load in progress: queued (waiting for its turn or for memory), reading (files from disk, on a
    thread beside the decoding), building, loading (tensors into memory between decode steps), warming."""

    stage: str
    bytes_read: int
    bytes_loaded: int
    bytes_total: int
    elapsed_s: float


class Model(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extras beyond OpenAI's schema, useful to a local user:
    context_length: int | None = None
    size_bytes: int = 0
    source: str = "models_dir"
    status: Literal["available", "loaded", "loading", "failed"] = "available"
    loaded: bool = False
    error: ModelError | None = None
    # Residency (unix times): when it was loaded and last used, when it unloads if nobody uses it (null:
    # pinned, busy, kept forever or not loaded), and the keep-alive that applies to it.
    pinned: bool = False
    keep_alive_s: float | None = None
    loaded_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None
    requests_running: int = 0
    progress: LoadProgress | None = None  # while loading
    load_s: float | None = None  # how long its last load took, warm-up included
    warmup_s: float | None = None  # the warm-up generation's share (kernel compilation on a GPU)


class ModelList(Struct):
    data: list[Model]
    object: Literal["list"] = "list"
