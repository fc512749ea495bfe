"""The systemd user unit for the server. systemd is the restart authority here, so no watchdog unit."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.service.spec import SYSTEMD_UNIT, ServiceSpec

RESTART_BUDGET = 5  # starts per hour, the same budget the watchdog keeps on macOS
WATCHDOG_SEC = 60  # the server pings every WatchdogSec/3 while its loop runs and the engine is not stalled
START_TIMEOUT_S = 120  # READY=1 comes once the engine process is up


def _exec_arg(arg: str) -> str:
    # systemd's command-line syntax: % starts a specifier, $ a variable; quote what has spaces or quotes.
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_dir(spec: ServiceSpec) -> Path:
    return Path(spec.home) / ".config" / "systemd" / "user"


def server_unit(spec: ServiceSpec) -> str:
    exec_start = " ".join(_exec_arg(a) for a in spec.serve_argv())
    return f"""\
[Unit]
Description=mlx-gateway: an OpenAI-compatible API for local MLX models
# The restart budget: at most {RESTART_BUDGET} starts an hour, then the unit stays failed until a human runs
# `systemctl --user reset-failed {SYSTEMD_UNIT}` (see docs/operations.md).
StartLimitIntervalSec=3600
StartLimitBurst={RESTART_BUDGET}

[Service]
# READY=1 once the engine is up; WATCHDOG=1 pings from the event loop catch a hung server.
Type=notify
NotifyAccess=main
WatchdogSec={WATCHDOG_SEC}
ExecStart={exec_start}
Environment=PYTHONUNBUFFERED=1
# Settings and secrets (MLX_GATEWAY_API_KEY=...) belong here, mode 0600, not on the command line above.
EnvironmentFile=-%h/.config/mlx-gateway/env
Restart=on-failure
RestartSec=5
TimeoutStartSec={START_TIMEOUT_S}
# Longer than the drain deadline, so streams end with a final chunk and not a cut connection.
TimeoutStopSec={spec.stop_timeout_s}
# SIGTERM to the gateway only (it drains, then stops its engine in order); SIGKILL to whatever is left.
KillMode=mixed
SyslogIdentifier=mlx-gateway

[Install]
WantedBy=default.target
"""


def files(spec: ServiceSpec) -> dict[Path, bytes]:
    return {unit_dir(spec) / SYSTEMD_UNIT: server_unit(spec).encode()}
