"""Wire types of /health and /health/live (the status page reads the same)."""

from __future__ import annotations

from typing import Literal

from msgspec import UNSET, Struct, UnsetType

from gateway.admin.wire import LoadProgress


class RankHealth(Struct):
    rank: int
    host: str  # as the group's settings name it
    pid: int | None  # on its host, once it connected
    state: Literal["starting", "up", "late", "exited"]  # late: its heartbeat is overdue
    seconds_since_heartbeat: float | None
    exit: str | None = None


class GroupHealth(Struct):
    """The engine as an MLX distributed group (docs/operations.md)."""

    size: int
    backend: str
    parallelism: str
    state: Literal["forming", "up", "broken"]
    ranks: list[RankHealth]


class EngineHealth(Struct):
    state: str  # starting | up | restarting | down | stopped
    pid: int | None  # rank 0's, for a group
    restarts: int
    device: str | None
    last_exit: str | None
    seconds_since_progress: float | None  # while it has work; null when idle
    requests_running: int = 0  # as the engine itself counts them (last heartbeat)
    requests_waiting: int = 0
    group: GroupHealth | UnsetType = UNSET  # only when the engine is a distributed group


class MemoryHealth(Struct):
    """The engine's memory budget and what holds it; active_bytes is what MLX itself reports in use."""

    budget_bytes: int
    weights_bytes: int  # loaded models, and the load in progress
    kv_cache_bytes: int  # reserved by running requests (prompt + max_tokens each)
    prefix_cache_bytes: int
    active_bytes: int


class ResidentModel(Struct):
    id: str
    status: Literal["loaded", "loading"]
    size_bytes: int
    pinned: bool
    requests_running: int
    loaded_at: float | None
    last_used_at: float | None
    expires_at: float | None
    progress: LoadProgress | None


class Health(Struct):
    status: Literal["ok", "starting", "degraded", "stalled", "draining", "engine_down"]
    ready: bool
    reason: str | None
    models_loaded: int
    models_available: int
    requests_running: int
    requests_waiting: int
    engine: EngineHealth
    uptime_s: float
    version: str
    models: list[ResidentModel] = []  # loaded and loading models
    memory: MemoryHealth | None = None  # while the engine is up


class Liveness(Struct):
    status: Literal["alive", "engine_down"] = "alive"
