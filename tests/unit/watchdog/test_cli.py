"""`mlx-gateway watchdog --status`, `--reset`, the lock, and JSON lines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from gateway.watchdog import main
from gateway.watchdog.cli import EXIT_LOCKED, EXIT_NOT_OURS, _JsonWithFields
from gateway.watchdog.process import systemd_unit_in_charge
from gateway.watchdog.state import StateDir

NOWHERE = "http://127.0.0.1:9"  # discard port: nothing answers


def test_status_of_a_watchdog_that_gave_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = StateDir(tmp_path)
    folder.ledger.record("exited")
    folder.write_state(last_check_at=1.0, last_check_result="gave_up")
    folder.give_up("the server process is not running; 5 restarts in the window (budget 5)", 5)
    assert main(["--status", "--state-dir", str(tmp_path), "--url", NOWHERE, "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "NOT ANSWERING" in out and "NOT RUNNING" in out
    assert "server restarts in the last hour: 1" in out
    assert "GAVE UP:  the server process is not running" in out and "--reset" in out


def test_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    StateDir(tmp_path).ledger.record("hung")
    argv = ["--status", "--json", "--state-dir", str(tmp_path), "--url", NOWHERE, "--timeout", "0.5"]
    assert main(argv) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["watchdog"]["restarts_last_hour"] == 1 and data["watchdog"]["gave_up"] is False
    assert data["server"]["live"] is False


def test_status_without_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--status", "--state-dir", str(tmp_path / "none"), "--url", NOWHERE, "--timeout", "0.5"])
    assert "no state in" in capsys.readouterr().out


def test_reset_clears_marker_and_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = StateDir(tmp_path)
    folder.ledger.record("exited")
    folder.give_up("budget spent", 1)
    assert main(["--reset", "--state-dir", str(tmp_path)]) == 0
    assert folder.gave_up() is None and folder.ledger.starts() == []
    assert "cleared the give-up marker and the restart ledger (1 starts)" in capsys.readouterr().out


def test_a_second_watchdog_refuses_to_run(tmp_path: Path) -> None:
    holder = StateDir(tmp_path)
    assert holder.acquire_lock()
    try:
        assert main(["--state-dir", str(tmp_path), "--url", NOWHERE]) == EXIT_LOCKED
    finally:
        holder.release_lock()
        logging.getLogger().handlers.clear()


def test_bad_setting_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--interval", "-1", "--state-dir", str(tmp_path)])
    assert exc.value.code == 2


def test_json_lines_carry_the_event_fields() -> None:
    record = logging.LogRecord("mlx_gateway.watchdog", logging.WARNING, __file__, 1, "restarting %s",
                               ("now",), None)
    record.fields = {"event": "restart", "pid": 42}
    entry = json.loads(_JsonWithFields().format(record))
    assert entry["message"] == "restarting now" and entry["event"] == "restart" and entry["pid"] == 42
    assert entry["level"] == "warning"


def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "\n".join(f'  {verb}) echo {state} ;;' for verb, state in answers.items())
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\ncase "$2" in\n{cases}\n  *) exit 1 ;;\nesac\n')
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("answers", [{"is-active": "active"},
                                     {"is-active": "inactive", "is-enabled": "enabled"}])
def test_refuses_to_run_where_systemd_restarts_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str],
                                                          answers: dict[str, str]) -> None:
    fake_systemctl(tmp_path, monkeypatch, answers)
    try:
        assert main(["--state-dir", str(tmp_path / "state"), "--url", NOWHERE]) == EXIT_NOT_OURS
    finally:
        logging.getLogger().handlers.clear()
    assert "systemd is the restart authority" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # no lock, no ledger: it never started


def test_an_inactive_disabled_unit_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_systemctl(tmp_path, monkeypatch, {"is-active": "inactive", "is-enabled": "disabled"})
    assert systemd_unit_in_charge() is None
