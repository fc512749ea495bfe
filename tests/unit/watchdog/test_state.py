"""The state folder: give-up marker, reset, the single-instance lock, and read_status for metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from gateway.watchdog import WatchdogStatus, read_status
from gateway.watchdog.state import StateDir


def test_marker_and_reset(tmp_path: Path) -> None:
    folder = StateDir(tmp_path)
    assert folder.gave_up() is None
    folder.ledger.record("exited")
    folder.give_up("the server process is not running; 5 restarts in the window", 5)
    marker = folder.gave_up()
    assert marker is not None and "5 restarts" in marker["reason"]
    assert marker["clear_with"] == "mlx-gateway watchdog --reset"
    folder.reset()
    assert folder.gave_up() is None
    assert folder.ledger.starts() == []


def test_an_unreadable_marker_still_means_gave_up(tmp_path: Path) -> None:
    (tmp_path / "gave-up.json").write_text("garbage")
    assert StateDir(tmp_path).gave_up() is not None


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    assert first.acquire_lock()
    assert not second.acquire_lock()
    assert second.lock_held()
    first.release_lock()
    assert not second.lock_held()
    # A holder killed with SIGKILL releases it too: the kernel drops flock locks with the process.
    code = ("import sys, time; from pathlib import Path; from gateway.watchdog.state import StateDir; "
            f"assert StateDir(Path({str(tmp_path)!r})).acquire_lock(); print('locked', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert not second.acquire_lock()
        holder.kill()
        holder.wait(5)
        assert second.acquire_lock()
    finally:
        holder.kill()
        holder.wait(5)
        second.release_lock()


def test_read_status_is_none_for_a_folder_never_used(tmp_path: Path) -> None:
    assert read_status(tmp_path / "missing") is None
    assert read_status(tmp_path) is None


def test_read_status_reports_what_metrics_need(tmp_path: Path) -> None:
    folder = StateDir(tmp_path)
    now = time.time()
    folder.ledger.record("exited", now=now - 4000)  # outside the hour
    folder.ledger.record("exited", now=now - 100)
    folder.ledger.record("hung", now=now - 10)
    folder.write_state(last_check_at=now, last_check_result="restarted", server_health="starting")
    status = read_status(tmp_path)
    assert status == WatchdogStatus(restarts_last_hour=2, gave_up=False, gave_up_reason=None,
                                    last_check_at=now, last_check_result="restarted",
                                    server_health="starting", watchdog_pid=os.getpid(), running=False)
    folder.give_up("budget spent", 2)
    assert folder.acquire_lock()
    try:
        status = read_status(tmp_path)
        assert status is not None and status.gave_up and status.gave_up_reason == "budget spent"
        assert status.running
    finally:
        folder.release_lock()
