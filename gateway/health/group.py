"""The engine group's ranks on /health and /metrics (set only when the engine is a distributed group)."""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from gateway import metrics
from gateway.health.wire import GroupHealth, RankHealth
from mlx_backend.client.group import GroupStatus


def group_health(status: GroupStatus | None) -> GroupHealth | UnsetType:
    """The group's part of /health, and its gauges; UNSET (and no gauges) for one engine process."""
    if status is None:
        return UNSET
    metrics.ENGINE_GROUP_UP.set(1 if status.state == "up" else 0)
    for rank in status.ranks:
        labels = (str(rank.rank), rank.host)
        metrics.ENGINE_RANK_UP.labels(*labels).set(1 if rank.state == "up" else 0)
        if rank.seconds_since_heartbeat is not None:
            metrics.ENGINE_RANK_HEARTBEAT_AGE.labels(*labels).set(rank.seconds_since_heartbeat)
    return GroupHealth(
        size=status.size, backend=status.backend, parallelism=status.parallelism,
        state=status.state,  # type: ignore[arg-type]
        ranks=[RankHealth(rank=r.rank, host=r.host, pid=r.pid, state=r.state,  # type: ignore[arg-type]
                          seconds_since_heartbeat=r.seconds_since_heartbeat, exit=r.exit) for r in status.ranks],
    )
