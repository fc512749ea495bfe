"""launchd property lists for the server and the watchdog, as a user agent or a LaunchDaemon.

- Agent (gui/$UID domain, ~/Library/LaunchAgents): starts at login, runs as the user.
- Daemon (system domain, /Library/LaunchDaemons): starts at boot, before anyone logs in. The server runs
  as the user (`UserName`), so models, the Hugging Face cache and logs stay in that user's home. The
  watchdog runs as root: only root may `launchctl kickstart` a system-domain job, and it takes the
  server's pid from launchd, never from a file the user could write.
"""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

from gateway.service.spec import SERVER_LABEL, WATCHDOG_LABEL, ServiceSpec

WATCHDOG_EXIT_TIMEOUT_S = 10  # beyond the watchdog's own stop deadline: let it finish a stop it began


def agents_dir(spec: ServiceSpec) -> Path:
    return Path(spec.home) / "Library" / "LaunchAgents"


DAEMONS_DIR = Path("/Library/LaunchDaemons")


def log_dir(spec: ServiceSpec, daemon: bool) -> Path:
    return Path("/Library/Logs/mlx-gateway") if daemon else server_log_dir(spec)


def server_log_dir(spec: ServiceSpec) -> Path:
    return Path(spec.home) / "Library" / "Logs" / "mlx-gateway"  # the server runs as the user either way


def state_dir(spec: ServiceSpec, daemon: bool) -> Path:
    if daemon:
        return Path("/Library/Application Support/mlx-gateway/watchdog")
    return Path(spec.home) / "Library" / "Application Support" / "mlx-gateway" / "watchdog"


def server_plist(spec: ServiceSpec, daemon: bool = False) -> dict[str, Any]:
    log = str(server_log_dir(spec) / "server.log")
    plist: dict[str, Any] = {
        "Label": SERVER_LABEL,
        "ProgramArguments": spec.serve_argv(),
        "EnvironmentVariables": {
            "HOME": spec.home,  # a daemon gets no HOME of its own; the HF cache and ~ paths need it
            "PYTHONUNBUFFERED": "1",
            "MLX_GATEWAY_WATCHDOG_STATE_DIR": str(state_dir(spec, daemon)),  # exported as metrics
        },
        "WorkingDirectory": spec.home,
        "RunAtLoad": True,  # launchd starts it at login/boot; every restart after that is the watchdog's
        # No KeepAlive: launchd would restart a crash loop forever. The watchdog is the restart authority.
        "KeepAlive": False,
        "ThrottleInterval": 10,
        "ExitTimeOut": spec.stop_timeout_s,  # SIGKILL only after the drain deadline has passed
        "ProcessType": "Interactive",  # inference needs the performance cores, not background QoS
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    if daemon:
        plist["UserName"] = spec.user
    return plist


def watchdog_plist(spec: ServiceSpec, daemon: bool = False) -> dict[str, Any]:
    log = str(log_dir(spec, daemon) / "watchdog.log")
    argv = [spec.python, "-m", "gateway.watchdog", "--launchd-job", SERVER_LABEL, "--url", spec.url,
            "--state-dir", str(state_dir(spec, daemon)), "--stop-timeout", str(spec.stop_timeout_s),
            "--log-json"]
    return {
        "Label": WATCHDOG_LABEL,
        "ProgramArguments": argv,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
        "RunAtLoad": True,
        # Restarted if it crashes; its ledger and give-up marker are files, so a restart forgets nothing.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 30,
        "ExitTimeOut": spec.stop_timeout_s + WATCHDOG_EXIT_TIMEOUT_S,
        "ProcessType": "Standard",  # not Background: a throttled probe would read as a hung server
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }


def render(plist: dict[str, Any]) -> bytes:
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=True)


def files(spec: ServiceSpec, daemon: bool = False) -> dict[Path, bytes]:
    folder = DAEMONS_DIR if daemon else agents_dir(spec)
    return {
        folder / f"{SERVER_LABEL}.plist": render(server_plist(spec, daemon)),
        folder / f"{WATCHDOG_LABEL}.plist": render(watchdog_plist(spec, daemon)),
    }
