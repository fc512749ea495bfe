"""The restart ledger: every server start the watchdog makes, in a JSON file that outlives the watchdog.

The budget counts restarts after a failure. A first start into a quiet window (nothing on the ledger
within it) is written with `counted: false` and costs nothing; any later start in the window counts,
so a watchdog or a machine restarting in a loop still spends the budget.

Wall-clock times, because the ledger must mean the same thing to the next watchdog process. A start dated
in the future (the clock went back) still counts: the budget errs on the side of restarting less.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mlx_gateway.watchdog")

KEEP_S = 24 * 3600  # history kept for --status and forensics, far beyond any sensible window


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the server reads it to export metrics, maybe as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any | None:
    """The file's JSON, None when absent; ValueError when unreadable garbage."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return json.loads(text)


@dataclass(frozen=True)
class Start:
    at: float  # wall-clock seconds
    reason: str
    counted: bool = True  # False: a first start, not a restart after a failure

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "reason": self.reason, **({} if self.counted else {"counted": False})}


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> list[Start] | None:
        """The starts on file; None when the file is unreadable."""
        try:
            data = read_json(self.path)
            if data is None:
                return []
            return [Start(float(s["at"]), str(s["reason"]), s.get("counted", True) is not False)
                    for s in data["starts"]]
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            log.error("restart ledger %s is unreadable; counting it as empty", self.path)
            return None

    def starts(self) -> list[Start]:
        return self._load() or []

    def count(self, window_s: float, now: float | None = None) -> int:
        """Restarts in the window: the budget's measure (first starts are not counted)."""
        now = time.time() if now is None else now
        return sum(1 for s in self.starts() if s.counted and now - s.at < window_s)

    def quiet(self, window_s: float, now: float | None = None) -> bool:
        """No start at all, counted or not, in the window: a first start now would be free."""
        now = time.time() if now is None else now
        return not any(now - s.at < window_s for s in self.starts())

    def record(self, reason: str, now: float | None = None, *, counted: bool = True) -> None:
        now = time.time() if now is None else now
        loaded = self._load()
        if loaded is None:  # keep the evidence; a watchdog that never restarts again would be worse
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(self.path.name + ".corrupt"))
        kept = [s for s in loaded or [] if now - s.at < KEEP_S]
        kept.append(Start(now, reason, counted))
        write_json_atomic(self.path, {"version": 1, "starts": [s.to_json() for s in kept]})

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
