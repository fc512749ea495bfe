"""One check's work, with the server and the probes scripted: restart, misses, give up, reset."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.watchdog import loop, probe
from gateway.watchdog.config import WatchdogConfig
from gateway.watchdog.decide import Action
from gateway.watchdog.loop import Watchdog
from gateway.watchdog.process import StartError
from gateway.watchdog.state import StateDir, read_status


class FakeServer:
    """A server whose pid and liveness the test sets; start() brings up `next_pid` (or crashes)."""

    def __init__(self) -> None:
        self.current: int | None = 100
        self.live = True
        self.starts = 0
        self.next_pid = 200
        self.crash_on_start = False
        self.refuse_start = False

    def pid(self) -> int | None:
        return self.current

    def start(self) -> None:
        if self.refuse_start:
            raise StartError("launchctl said no")
        self.starts += 1
        if self.crash_on_start:
            self.current, self.live = None, False
        else:
            self.current, self.live = self.next_pid, True
            self.next_pid += 1

    def exit_note(self) -> str:
        return "exited with code 1"

    def reap(self) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(probe, "live", lambda url, timeout: fake.live)
    monkeypatch.setattr(probe, "health", lambda url, timeout: (200, {"status": "ok"}) if fake.live
                        else (None, None))
    monkeypatch.setattr(loop, "managed_by_systemd", lambda pid: None)
    return fake


@pytest.fixture
def stops(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> list[int]:
    stopped: list[int] = []

    def fake_stop(pid: int, timeout_s: float, reap: Callable[[], None]) -> str:
        stopped.append(pid)
        server.current = None
        return "exited after SIGTERM"

    monkeypatch.setattr(loop, "stop", fake_stop)
    return stopped


def make(tmp_path: Path, server: FakeServer, **overrides: object) -> Watchdog:
    settings: dict[str, object] = {"misses": 2, "max_restarts": 3, "start_timeout_s": 0.5, "timeout_s": 0.1,
                                   **overrides}
    config = WatchdogConfig(state_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return Watchdog(config, server, StateDir(tmp_path))


def kill(server: FakeServer) -> None:
    server.current, server.live = None, False


def test_healthy_server_is_left_alone(tmp_path: Path, server: FakeServer, stops: list[int]) -> None:
    dog = make(tmp_path, server)
    assert dog.check_once().action is Action.OK
    assert (server.starts, stops) == (0, [])
    status = read_status(tmp_path)
    assert status is not None and status.last_check_result == "ok" and status.server_health == "ok"


def test_no_server_at_the_first_check_is_started_free_of_the_budget(tmp_path: Path, server: FakeServer,
                                                                      stops: list[int],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    kill(server)
    dog = make(tmp_path, server)
    with caplog.at_level(logging.INFO):
        assert dog.check_once().action is Action.RESTART
    assert (server.starts, stops) == (1, [])  # nothing to stop
    assert dog.state.ledger.count(3600) == 0 and len(dog.state.ledger.starts()) == 1
    assert "first start, not counted" in caplog.text and "server is back" in caplog.text
    status = read_status(tmp_path)
    assert status is not None and status.last_check_result == "restarted" and status.restarts_last_hour == 0


def test_a_server_that_dies_after_being_seen_is_restarted_and_counted(tmp_path: Path, server: FakeServer,
                                                                      stops: list[int]) -> None:
    dog = make(tmp_path, server)
    assert dog.check_once().action is Action.OK
    kill(server)
    assert dog.check_once().action is Action.RESTART
    assert dog.state.ledger.count(3600) == 1


def test_the_budget_is_restarts_after_failures_not_the_first_start(tmp_path: Path, server: FakeServer,
                                                                   stops: list[int]) -> None:
    kill(server)
    dog = make(tmp_path, server)  # budget 3
    assert dog.check_once().action is Action.RESTART  # the first start
    actions = []
    for _ in range(4):
        kill(server)
        actions.append(dog.check_once().action)
    assert actions == [Action.RESTART] * 3 + [Action.GIVE_UP]
    assert server.starts == 4 and dog.state.ledger.count(3600) == 3


def test_a_watchdog_restarted_in_a_loop_spends_the_budget(tmp_path: Path, server: FakeServer,
                                                          stops: list[int]) -> None:
    """A boot loop: each new watchdog finds the server down; only the first start into a quiet window is free."""
    actions = []
    for _ in range(6):
        kill(server)
        actions.append(make(tmp_path, server).check_once().action)
    assert actions == [Action.RESTART] * 4 + [Action.GIVE_UP, Action.OBSERVE]
    assert server.starts == 4


def test_a_quiet_window_makes_a_first_start_free_again(tmp_path: Path, server: FakeServer,
                                                       stops: list[int]) -> None:
    StateDir(tmp_path).ledger.record("exited", now=time.time() - 3601)  # yesterday's trouble
    kill(server)
    dog = make(tmp_path, server)
    dog.check_once()
    assert server.starts == 1 and dog.state.ledger.count(3600) == 0


def test_a_hung_server_at_the_first_check_is_a_failure(tmp_path: Path, server: FakeServer,
                                                       stops: list[int]) -> None:
    server.live = False
    dog = make(tmp_path, server, misses=1)
    assert dog.check_once().action is Action.RESTART
    assert stops == [100] and dog.state.ledger.count(3600) == 1


def test_under_launchd_the_first_start_is_launchds_so_the_watchdogs_counts(tmp_path: Path, server: FakeServer,
                                                                          stops: list[int]) -> None:
    kill(server)  # launchd's RunAtLoad start already failed
    dog = make(tmp_path, server, launchd_job="io.mlx-gateway.server")
    assert dog.check_once().action is Action.RESTART
    assert dog.state.ledger.count(3600) == 1


def test_hung_server_is_stopped_after_the_misses(tmp_path: Path, server: FakeServer,
                                                 stops: list[int]) -> None:
    server.live = False
    dog = make(tmp_path, server)
    assert dog.check_once().action is Action.MISS
    assert stops == []
    assert dog.check_once().action is Action.RESTART
    assert (stops, server.starts, server.current) == ([100], 1, 200)
    assert dog.check_once().action is Action.OK
    assert dog.misses == 0


def test_crash_at_every_start_spends_the_budget_then_gives_up(tmp_path: Path, server: FakeServer,
                                                             stops: list[int],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    server.current, server.live, server.crash_on_start = None, False, True
    dog = make(tmp_path, server)
    with caplog.at_level(logging.INFO):
        results = [dog.check_once().action for _ in range(7)]
    # The first start, then the budget of 3 restarts after failures.
    assert results == [Action.RESTART] * 4 + [Action.GIVE_UP, Action.OBSERVE, Action.OBSERVE]
    assert server.starts == 4
    assert "exited while starting (exited with code 1)" in caplog.text
    assert "GIVING UP" in caplog.text and "3 restarts in the window" in caplog.text
    assert caplog.text.count("restarts are off") == 1  # said once, not every interval
    status = read_status(tmp_path)
    assert status is not None and status.gave_up and status.restarts_last_hour == 3
    # A human fixes the cause and resets: exactly one more start, then quiet.
    server.crash_on_start = False
    dog.state.reset()
    assert [dog.check_once().action for _ in range(3)] == [Action.RESTART, Action.OK, Action.OK]
    assert server.starts == 5 and dog.state.ledger.count(3600) == 1


def test_start_refused_is_counted_and_logged(tmp_path: Path, server: FakeServer, stops: list[int],
                                            caplog: pytest.LogCaptureFixture) -> None:
    dog = make(tmp_path, server)
    dog.check_once()
    server.current, server.live, server.refuse_start = None, False, True
    dog.check_once()
    assert dog.state.ledger.count(3600) == 1
    assert "restart failed: launchctl said no" in caplog.text


def test_a_new_server_that_never_answers_is_stopped(tmp_path: Path, server: FakeServer, stops: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server.current, server.live = None, False
    real_start = server.start

    def start_silent() -> None:
        real_start()
        server.live = False  # process up, API never answers

    monkeypatch.setattr(server, "start", start_silent)
    dog = make(tmp_path, server)
    dog.check_once()
    assert stops == [200]
    status = read_status(tmp_path)
    assert status is not None and status.last_check_result == "restart_failed"


def test_ledger_left_by_an_earlier_watchdog_counts(tmp_path: Path, server: FakeServer,
                                                   stops: list[int]) -> None:
    StateDir(tmp_path).ledger.record("exited")
    StateDir(tmp_path).ledger.record("exited")
    server.current, server.live, server.crash_on_start = None, False, True
    dog = make(tmp_path, server)
    assert [dog.check_once().action for _ in range(2)] == [Action.RESTART, Action.GIVE_UP]
    assert server.starts == 1
