"""The launchd property lists: they parse, carry the keys launchd needs, and agree with each other."""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

import pytest

from gateway.service import launchd
from gateway.service.spec import SERVER_LABEL, WATCHDOG_LABEL, ServiceSpec
from gateway.watchdog.config import build_parser, load_config

SPEC = ServiceSpec(python="/opt/venv/bin/python", home="/Users/ada", user="ada", port=8123,
                   drain_timeout_s=20, serve_args=("--models-dir", "/Users/ada/models"))
PROCESS_TYPES = {"Background", "Standard", "Adaptive", "Interactive"}


def roundtrip(plist: dict[str, Any]) -> dict[str, Any]:
    data = launchd.render(plist)
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')
    parsed = plistlib.loads(data, fmt=plistlib.FMT_XML)
    assert parsed == plist
    return parsed  # type: ignore[no-any-return]


@pytest.mark.parametrize("daemon", [False, True])
def test_server_plist(daemon: bool) -> None:
    p = roundtrip(launchd.server_plist(SPEC, daemon))
    assert p["Label"] == SERVER_LABEL == "io.mlx-gateway.server"
    assert p["ProgramArguments"][:4] == ["/opt/venv/bin/python", "-m", "gateway.cli", "serve"]
    assert p["ProgramArguments"][-2:] == ["--models-dir", "/Users/ada/models"]
    assert p["RunAtLoad"] is True
    assert p["KeepAlive"] is False  # the watchdog is the restart authority: launchd must not fight it
    assert isinstance(p["ThrottleInterval"], int) and p["ThrottleInterval"] >= 10
    assert isinstance(p["ExitTimeOut"], int) and p["ExitTimeOut"] > SPEC.drain_timeout_s
    assert p["ProcessType"] in PROCESS_TYPES
    assert p["StandardOutPath"] == p["StandardErrorPath"] == "/Users/ada/Library/Logs/mlx-gateway/server.log"
    assert p["EnvironmentVariables"]["HOME"] == "/Users/ada"
    assert p.get("UserName") == ("ada" if daemon else None)


@pytest.mark.parametrize("daemon", [False, True])
def test_watchdog_plist(daemon: bool) -> None:
    p = roundtrip(launchd.watchdog_plist(SPEC, daemon))
    assert p["Label"] == WATCHDOG_LABEL == "io.mlx-gateway.watchdog"
    assert p["ProgramArguments"][:3] == ["/opt/venv/bin/python", "-m", "gateway.watchdog"]
    assert p["RunAtLoad"] is True
    assert p["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(p["ThrottleInterval"], int)
    assert p["ProcessType"] in PROCESS_TYPES and p["ProcessType"] != "Background"
    assert "UserName" not in p  # a daemon watchdog is root: only root may kickstart system-domain jobs
    logs = "/Library/Logs/mlx-gateway" if daemon else "/Users/ada/Library/Logs/mlx-gateway"
    assert p["StandardOutPath"] == p["StandardErrorPath"] == f"{logs}/watchdog.log"


@pytest.mark.parametrize("daemon", [False, True])
def test_the_two_plists_agree(daemon: bool) -> None:
    server = launchd.server_plist(SPEC, daemon)
    watchdog = launchd.watchdog_plist(SPEC, daemon)
    assert server["Label"].rsplit(".", 1)[0] == watchdog["Label"].rsplit(".", 1)[0] == "io.mlx-gateway"
    # The watchdog's own parser reads its arguments: nothing in the plist is a typo.
    config = load_config(build_parser().parse_args(watchdog["ProgramArguments"][3:]), env={})
    assert config.launchd_job == server["Label"]
    assert config.url == "http://127.0.0.1:8123"
    assert config.log_json
    assert str(config.state_dir) == server["EnvironmentVariables"]["MLX_GATEWAY_WATCHDOG_STATE_DIR"]
    # Deadlines nest: drain < watchdog's SIGKILL deadline < launchd's SIGKILL of the watchdog itself.
    assert SPEC.drain_timeout_s < config.stop_timeout_s < watchdog["ExitTimeOut"]
    assert config.stop_timeout_s <= server["ExitTimeOut"]


def test_server_arguments_are_flags_serve_knows() -> None:
    settings = pytest.importorskip("gateway.settings")
    argv = launchd.server_plist(SPEC)["ProgramArguments"][4:]
    parsed = settings.parse_settings(argv, env={})
    assert (parsed.host, parsed.port, parsed.drain_timeout_s) == ("127.0.0.1", 8123, 20.0)
    assert parsed.log_json and parsed.models_dirs == (Path("/Users/ada/models"),)


def test_files_go_where_launchd_looks() -> None:
    agents = launchd.files(SPEC)
    assert sorted(str(p) for p in agents) == [
        "/Users/ada/Library/LaunchAgents/io.mlx-gateway.server.plist",
        "/Users/ada/Library/LaunchAgents/io.mlx-gateway.watchdog.plist",
    ]
    assert sorted(str(p) for p in launchd.files(SPEC, daemon=True)) == [
        "/Library/LaunchDaemons/io.mlx-gateway.server.plist",
        "/Library/LaunchDaemons/io.mlx-gateway.watchdog.plist",
    ]
