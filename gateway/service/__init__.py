"""Service files: launchd plists (server + watchdog) and the systemd user unit, generated and installed.

Entry point: `main(argv)` for `mlx-gateway service print | install | uninstall | templates`.
"""

from __future__ import annotations

from gateway.service.cli import main

__all__ = ["main"]
