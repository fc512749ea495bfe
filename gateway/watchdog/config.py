"""The watchdog's settings: one flag and one `MLX_GATEWAY_WATCHDOG_*` environment variable each.

Precedence: flag > environment > default. The server command comes after `--`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MLX_GATEWAY_WATCHDOG_"


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlx-gateway" / "watchdog"
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mlx-gateway" / "watchdog"


def default_log_dir(env: Mapping[str, str] | None = None) -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Logs" / "mlx-gateway"
    return default_state_dir(env).parent


def default_server_command() -> list[str]:
    # The running interpreter, not PATH: launchd and cron give a bare PATH.
    return [sys.executable, "-m", "gateway.cli", "serve"]


@dataclass(frozen=True)
class WatchdogConfig:
    url: str = "http://127.0.0.1:11435"
    interval_s: float = 30.0
    timeout_s: float = 5.0
    misses: int = 3
    max_restarts: int = 5
    window_s: float = 3600.0
    stop_timeout_s: float = 45.0  # longer than the server's 30 s drain, so a drain is never cut short
    start_timeout_s: float = 60.0
    state_dir: Path = field(default_factory=default_state_dir)
    pid_file: Path | None = None  # default: <state_dir>/server.pid
    server_log: Path | None = None  # default: <log dir>/server.log
    process_match: str = "gateway"
    launchd_job: str | None = None
    log_json: bool = False
    command: tuple[str, ...] = field(default_factory=lambda: tuple(default_server_command()))

    @property
    def pid_path(self) -> Path:
        return self.pid_file or self.state_dir / "server.pid"

    @property
    def server_log_path(self) -> Path:
        return self.server_log or default_log_dir() / "server.log"

    def check(self) -> None:
        for name in ("interval_s", "timeout_s", "window_s", "stop_timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0")
        if self.misses < 1:
            raise ValueError("misses must be at least 1")
        if self.max_restarts < 1:
            raise ValueError("max_restarts must be at least 1")
        if not self.command and not self.launchd_job:
            raise ValueError("no server command")


# (field, flag, type, help); the env variable is ENV_PREFIX + field.upper().
_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("url", "--url", str, "the server's base URL to probe"),
    ("interval_s", "--interval", float, "seconds between checks"),
    ("timeout_s", "--timeout", float, "seconds a probe may take"),
    ("misses", "--misses", int, "consecutive failed liveness probes of a live process that mean 'hung'"),
    ("max_restarts", "--max-restarts", int, "restarts after a failure allowed in the window (the first start "
     "is free); then give up"),
    ("window_s", "--window", float, "the rolling window of the restart budget, seconds"),
    ("stop_timeout_s", "--stop-timeout", float, "seconds from SIGTERM to SIGKILL (keep above the drain)"),
    ("start_timeout_s", "--start-timeout", float, "seconds a new server has to answer /health/live"),
    ("state_dir", "--state-dir", Path, "ledger, give-up marker, state and lock files"),
    ("pid_file", "--pid-file", Path, "the server's pid file (default: STATE_DIR/server.pid)"),
    ("server_log", "--server-log", Path, "where a spawned server's output is appended"),
    ("process_match", "--process-match", str, "text the server's command line must contain to be signalled"),
    ("launchd_job", "--launchd-job", str, "macOS: start the server with launchctl kickstart of this label"),
)


def build_parser(prog: str = "mlx-gateway watchdog") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Keep an mlx-gateway server alive: check it, restart it within a budget, give up loudly.",
        epilog="Everything after '--' is the server command (default: this Python's 'gateway.cli serve'). "
        f"Each option can also be set with {ENV_PREFIX}<NAME>, e.g. {ENV_PREFIX}INTERVAL_S.",
    )
    for name, flag, kind, text in _OPTIONS:
        metavar = "SECONDS" if name.endswith("_s") else "N" if kind is int else None
        parser.add_argument(flag, dest=name, type=kind, default=None, metavar=metavar,
                            help=f"{text} (env {ENV_PREFIX}{name.upper()})")
    parser.add_argument("--log-json", dest="log_json", action="store_true", default=None,
                        help=f"log JSON lines (env {ENV_PREFIX}LOG_JSON)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true",
                      help="print the watchdog's state and server health; exit 1 if either needs a human")
    mode.add_argument("--reset", action="store_true", help="clear the give-up marker and the restart ledger")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    return parser


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> WatchdogConfig:
    """Merge flags over environment over defaults; raise ValueError naming a bad value."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, _, kind, _ in _OPTIONS:
        raw = getattr(args, name, None)
        if raw is None and (text := env.get(ENV_PREFIX + name.upper())):
            try:
                raw = kind(text)
            except ValueError as exc:
                raise ValueError(f"invalid value for {ENV_PREFIX}{name.upper()}: {text!r}") from exc
        if raw is not None:
            values[name] = Path(raw).expanduser() if kind is Path else raw
    log_json = args.log_json
    if log_json is None:
        log_json = env.get(ENV_PREFIX + "LOG_JSON", "").strip().lower() in ("1", "true", "yes", "on")
    values["log_json"] = log_json
    command: Sequence[str] = args.command or []
    if command:
        values["command"] = tuple(command)
    config = WatchdogConfig(**values)  # type: ignore[arg-type]
    config.check()
    return config
