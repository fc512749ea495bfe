"""`mlx-gateway service`: print, install and uninstall (dry runs and into a fake home), templates."""

from __future__ import annotations

import os
import plistlib
from pathlib import Path

import pytest

from gateway.service import main
from gateway.service.cli import template_files


def test_print_linux(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["print", "--platform", "linux", "--port", "9000", "--", "--models-dir", "/m"]) == 0
    out = capsys.readouterr().out
    assert "/.config/systemd/user/mlx-gateway.service" in out
    assert "--port 9000 --drain-timeout-s 30 --log-json --models-dir /m" in out


def test_print_macos(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["print", "--platform", "macos"]) == 0
    out = capsys.readouterr().out
    assert out.count("<?xml") == 2 and "io.mlx-gateway.watchdog" in out


def test_install_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["install", "--platform", "macos", "--dry-run"]) == 0
    out = capsys.readouterr().out
    uid = os.getuid()
    assert f"would run: launchctl bootout gui/{uid}/io.mlx-gateway.watchdog" in out
    assert out.index("bootout gui") < out.index("bootstrap gui")
    plist = tmp_path / "Library" / "LaunchAgents" / "io.mlx-gateway.server.plist"
    assert f"would run: launchctl bootstrap gui/{uid} {plist}" in out
    assert list(tmp_path.iterdir()) == []


def test_install_and_uninstall_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["install", "--platform", "macos", "--no-start"]) == 0
    agents = tmp_path / "Library" / "LaunchAgents"
    for label in ("server", "watchdog"):
        path = agents / f"io.mlx-gateway.{label}.plist"
        assert plistlib.loads(path.read_bytes())["Label"] == f"io.mlx-gateway.{label}"
        assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "Library" / "Logs" / "mlx-gateway").is_dir()
    assert main(["uninstall", "--platform", "macos", "--no-start"]) == 0
    assert list(agents.iterdir()) == []


def test_a_daemon_server_never_runs_as_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--platform", "macos", "--daemon", "--user", "root", "--dry-run"]) == 2
    assert "refusing to run the server as root" in capsys.readouterr().err


def test_templates_check(tmp_path: Path) -> None:
    assert main(["templates", "--out", str(tmp_path), "--check"]) == 1
    assert main(["templates", "--out", str(tmp_path)]) == 0
    assert main(["templates", "--out", str(tmp_path), "--check"]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in template_files(tmp_path)) == [
        "LaunchAgents/io.mlx-gateway.server.plist", "LaunchAgents/io.mlx-gateway.watchdog.plist",
        "LaunchDaemons/io.mlx-gateway.server.plist", "LaunchDaemons/io.mlx-gateway.watchdog.plist",
    ]
