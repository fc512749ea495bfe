"""The external watchdog: restarts a dead or hung server within a budget, then gives up loudly.

Entry points: `main(argv)` (`mlx-gateway watchdog`, `--status`, `--reset`) and `read_status(state_dir)`
(the server exports it as metrics). See docs/operations.md for how it shares the job with launchd/systemd.
"""

from __future__ import annotations

from gateway.watchdog.cli import main
from gateway.watchdog.state import WatchdogStatus, read_status

__all__ = ["WatchdogStatus", "main", "read_status"]
