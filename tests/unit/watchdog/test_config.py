"""Watchdog settings: flag over environment over default; the server command after '--'."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.watchdog.config import WatchdogConfig, build_parser, load_config


def parse(argv: list[str], env: dict[str, str] | None = None) -> WatchdogConfig:
    return load_config(build_parser().parse_args(argv), env or {})


def test_defaults() -> None:
    config = parse([])
    assert (config.interval_s, config.misses, config.max_restarts, config.window_s) == (30.0, 3, 5, 3600.0)
    assert config.stop_timeout_s > 30  # longer than the server's default drain
    assert config.command == (sys.executable, "-m", "gateway.cli", "serve")
    assert config.pid_path == config.state_dir / "server.pid"
    assert config.launchd_job is None and not config.log_json


def test_flag_beats_environment_beats_default(tmp_path: Path) -> None:
    env = {"MLX_GATEWAY_WATCHDOG_INTERVAL_S": "7", "MLX_GATEWAY_WATCHDOG_MISSES": "4",
           "MLX_GATEWAY_WATCHDOG_STATE_DIR": str(tmp_path), "MLX_GATEWAY_WATCHDOG_LOG_JSON": "yes"}
    config = parse(["--interval", "2"], env)
    assert (config.interval_s, config.misses, config.state_dir, config.log_json) == (2.0, 4, tmp_path, True)


def test_server_command_after_double_dash() -> None:
    config = parse(["--interval", "1", "--", "mlx-gateway", "serve", "--port", "9000", "--log-json"])
    assert config.command == ("mlx-gateway", "serve", "--port", "9000", "--log-json")
    assert not config.log_json  # the server's flag, not the watchdog's


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"MLX_GATEWAY_WATCHDOG_MISSES": "many"}, "MLX_GATEWAY_WATCHDOG_MISSES"),
    (["--interval", "0"], {}, "interval_s"),
    (["--misses", "0"], {}, "misses"),
    (["--max-restarts", "0"], {}, "max_restarts"),
])
def test_bad_values_are_named(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv, env)
