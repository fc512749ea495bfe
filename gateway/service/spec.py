"""What a service file needs to know: how to run the server, where logs and state go, who runs it.

The restart authority, decided once for every generated file (docs/operations.md says why):
- systemd: systemd. Restart=on-failure within StartLimitBurst/StartLimitIntervalSec, WatchdogSec for
  hangs. No watchdog unit is generated.
- launchd: the watchdog. launchd has no restart budget, so the server's job never has KeepAlive; launchd
  starts it at load and the watchdog restarts it (launchctl kickstart -k) within its budget.
"""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass, field
from pathlib import Path

NAMESPACE = "io.mlx-gateway"
SERVER_LABEL = f"{NAMESPACE}.server"
WATCHDOG_LABEL = f"{NAMESPACE}.watchdog"
SYSTEMD_UNIT = "mlx-gateway.service"
STOP_MARGIN_S = 15.0  # stop deadlines exceed the drain by this much, so a drain is never cut short


@dataclass(frozen=True)
class ServiceSpec:
    python: str = field(default_factory=lambda: sys.executable)
    home: str = field(default_factory=lambda: str(Path.home()))
    user: str = field(default_factory=getpass.getuser)
    host: str = "127.0.0.1"
    port: int = 11435
    drain_timeout_s: float = 30.0
    serve_args: tuple[str, ...] = ()  # anything else for `mlx-gateway serve` (--models-dir, --api-key ...)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # bound everywhere, probed on loopback
        return f"http://{host}:{self.port}"

    @property
    def stop_timeout_s(self) -> int:
        return int(self.drain_timeout_s + STOP_MARGIN_S)

    def serve_argv(self) -> list[str]:
        return [self.python, "-m", "gateway.cli", "serve", "--host", self.host, "--port", str(self.port),
                "--drain-timeout-s", f"{self.drain_timeout_s:g}", "--log-json", *self.serve_args]


# Placeholders for the reference files committed in docker-less-mac/; `install` writes real ones.
TEMPLATE = ServiceSpec(python="__PYTHON__", home="__HOME__", user="__USER__")
