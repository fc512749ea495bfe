"""The watchdog's state folder: ledger, give-up marker, last-check state, and the single-instance lock.

`read_status` is what the server (metrics) and `mlx-gateway status` use; it only reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.watchdog.ledger import Ledger, read_json, write_json_atomic

LEDGER = "restarts.json"
MARKER = "gave-up.json"
STATE = "state.json"
LOCK = "watchdog.lock"


@dataclass(frozen=True)
class WatchdogStatus:
    restarts_last_hour: int
    gave_up: bool
    gave_up_reason: str | None
    last_check_at: float | None  # wall-clock seconds
    last_check_result: str | None  # ok | miss | restarted | restart_failed | gave_up | observing
    server_health: str | None  # the last /health status the watchdog saw
    watchdog_pid: int | None  # the pid that wrote the state (it may have exited since)
    running: bool  # a watchdog holds the lock now


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger = Ledger(path / LEDGER)
        self._lock_fd: int | None = None

    # -- give-up marker: only a human (--reset) removes it

    def gave_up(self) -> dict[str, Any] | None:
        try:
            data = read_json(self.path / MARKER)
        except (ValueError, OSError):
            return {"reason": "marker present but unreadable"}  # present is what matters
        return data if isinstance(data, dict) else None

    def give_up(self, reason: str, restarts: int) -> None:
        write_json_atomic(self.path / MARKER, {
            "at": time.time(), "reason": reason, "restarts_in_window": restarts,
            "clear_with": "mlx-gateway watchdog --reset",
        })

    def reset(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / MARKER).unlink()
        self.ledger.clear()

    # -- last check, for --status and metrics

    def write_state(self, **fields: Any) -> None:
        state = {"watchdog_pid": os.getpid(), "updated_at": time.time(), **fields}
        write_json_atomic(self.path / STATE, state)

    def read_state(self) -> dict[str, Any]:
        try:
            data = read_json(self.path / STATE)
        except (ValueError, OSError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- one watchdog at a time; the kernel drops the lock when the process dies, however it dies

    def acquire_lock(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock_held(self) -> bool:
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our probe lock too
        return False


def read_status(state_dir: Path) -> WatchdogStatus | None:
    """The watchdog's state for metrics and status; None when no watchdog ever used this folder."""
    if not state_dir.is_dir():
        return None
    folder = StateDir(state_dir)
    state = folder.read_state()
    marker = folder.gave_up()
    if not state and marker is None and not (state_dir / LEDGER).exists():
        return None
    return WatchdogStatus(
        restarts_last_hour=folder.ledger.count(3600.0),
        gave_up=marker is not None,
        gave_up_reason=str(marker.get("reason")) if marker else None,
        last_check_at=state.get("last_check_at"),
        last_check_result=state.get("last_check_result"),
        server_health=state.get("server_health"),
        watchdog_pid=state.get("watchdog_pid"),
        running=folder.lock_held(),
    )
