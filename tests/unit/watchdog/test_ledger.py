"""The restart ledger: rolling window, persistence across processes, atomic writes, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.watchdog.ledger import KEEP_S, Ledger, write_json_atomic

NOW = 1_700_000_000.0


def test_rolling_window_counts_only_recent_starts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "restarts.json")
    for ago in (3700, 3599, 1800, 10):
        ledger.record("exited", now=NOW - ago)
    assert ledger.count(3600, now=NOW) == 3
    assert ledger.count(60, now=NOW) == 1
    # The window rolls: an hour later only the newest is gone too.
    assert ledger.count(3600, now=NOW + 3591) == 0
    assert ledger.count(3600, now=NOW + 3589) == 1


def test_a_start_dated_in_the_future_still_counts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "restarts.json")
    ledger.record("exited", now=NOW + 600)  # the clock went back after this was written
    assert ledger.count(3600, now=NOW) == 1


def test_survives_a_new_process(tmp_path: Path) -> None:
    Ledger(tmp_path / "restarts.json").record("hung", now=NOW)
    again = Ledger(tmp_path / "restarts.json")  # what the next watchdog process sees
    assert [(s.at, s.reason) for s in again.starts()] == [(NOW, "hung")]
    data = json.loads((tmp_path / "restarts.json").read_text())
    assert data == {"version": 1, "starts": [{"at": NOW, "reason": "hung"}]}


def test_a_first_start_is_on_file_but_not_counted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "restarts.json")
    assert ledger.quiet(3600, now=NOW)
    ledger.record("first", now=NOW, counted=False)
    ledger.record("exited", now=NOW + 1)
    assert ledger.count(3600, now=NOW + 2) == 1  # the budget counts restarts only
    assert not ledger.quiet(3600, now=NOW + 2)  # but the window is no longer quiet
    assert ledger.quiet(3600, now=NOW + 3602)
    data = json.loads((tmp_path / "restarts.json").read_text())
    # Old entries (no `counted`) keep their meaning: a counted restart.
    assert data["starts"] == [{"at": NOW, "reason": "first", "counted": False}, {"at": NOW + 1, "reason": "exited"}]


def test_old_history_is_pruned(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "restarts.json")
    ledger.record("old", now=NOW - KEEP_S - 1)
    ledger.record("new", now=NOW)
    assert [s.reason for s in ledger.starts()] == ["new"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "restarts.json"
    Ledger(path).record("first", now=NOW)
    before = path.read_bytes()

    def broken_dump(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        Ledger(path).record("second", now=NOW + 1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restarts.json"]  # no temporary left behind


def test_atomic_write_replaces_and_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


@pytest.mark.parametrize("garbage", ["{not json", '{"starts": [{"at": "soon"}]}', "[]"])
def test_unreadable_ledger_counts_as_empty_and_is_kept_aside(tmp_path: Path, garbage: str) -> None:
    path = tmp_path / "restarts.json"
    path.write_text(garbage)
    ledger = Ledger(path)
    assert ledger.count(3600, now=NOW) == 0
    assert path.read_text() == garbage  # reading never changes the file (the server reads it too)
    ledger.record("exited", now=NOW)
    assert ledger.count(3600, now=NOW) == 1
    assert (tmp_path / "restarts.json.corrupt").read_text() == garbage


def test_clear(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "restarts.json")
    ledger.clear()  # nothing to clear is fine
    ledger.record("exited", now=NOW)
    ledger.clear()
    assert ledger.starts() == []
