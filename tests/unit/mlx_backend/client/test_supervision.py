"""How the gateway judges one engine process (ready in time, heartbeats, the stall clock) and how often it may
start a new one, on a clock the test moves (the process-level proof is tests/unit/mlx_backend/client/
test_engine_client.py and tests/integration/test_engine_faults.py)."""

from __future__ import annotations

import types

import pytest

from mlx_backend.client import supervision
from mlx_backend.client.supervision import ProcessWatch, RestartBudget, SupervisionPolicy
from mlx_backend.contract import Heartbeat, Ready

POLICY = SupervisionPolicy(stall_timeout_s=10.0, load_timeout_s=100.0, heartbeat_timeout_s=3.0,
                           loading_heartbeat_timeout_s=60.0, ready_timeout_s=20.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(supervision, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def heartbeat(progress: int, running: int = 0, loading: str | None = None, starting: bool = False) -> Heartbeat:
    return Heartbeat(progress, running, 0, loading, (), (), 0, 0, 0, starting=starting)


def ready_watch(clock: Clock) -> ProcessWatch:
    watch = ProcessWatch(POLICY)
    watch.new_process()
    watch.spawned()
    watch.on_ready(Ready(1, "cpu", "0", "0"))
    return watch


def test_a_restart_budget_allows_its_limit_per_rolling_hour(clock: Clock) -> None:
    budget = RestartBudget(2)
    assert budget.take() and budget.take()
    assert not budget.take()
    clock.now += 3601
    assert budget.take()
    assert budget.restarts == 3


def test_a_process_that_never_says_ready_is_killed_after_the_ready_timeout(clock: Clock) -> None:
    watch = ProcessWatch(POLICY)
    watch.new_process()
    watch.spawned()
    clock.now += 19
    assert watch.problem(busy=False) is None
    clock.now += 2
    assert watch.problem(busy=False) == "did not become ready within 20s"


def test_heartbeat_silence_means_frozen_but_a_load_may_be_silent_longer(clock: Clock) -> None:
    watch = ready_watch(clock)
    clock.now += 4
    assert "(frozen)" in (watch.problem(busy=False) or "")
    watch.on_heartbeat(heartbeat(0))
    watch.on_loading()  # a Loading event: native code may hold the GIL for seconds
    clock.now += 30
    assert watch.problem(busy=True) is None
    clock.now += 31
    assert "(frozen)" in (watch.problem(busy=True) or "")


def test_busy_without_progress_is_stalled_first_and_killed_at_one_and_a_half_times_the_limit(clock: Clock) -> None:
    watch = ready_watch(clock)
    for _ in range(11):  # heartbeats keep coming, progress does not move
        clock.now += 1
        watch.on_heartbeat(heartbeat(0, running=1))
        assert watch.problem(watch.busy(False)) is None
    assert watch.stalled
    for _ in range(5):
        clock.now += 1
        watch.on_heartbeat(heartbeat(0, running=1))
    assert "(stalled)" in (watch.problem(watch.busy(False)) or "")


def test_idle_time_is_not_judged_and_progress_restarts_the_clock(clock: Clock) -> None:
    watch = ready_watch(clock)
    for _ in range(30):  # idle half a minute: the clock keeps up
        clock.now += 1
        watch.on_heartbeat(heartbeat(0))
        assert watch.problem(watch.busy(False)) is None
    for step in range(30):  # busy and progressing
        clock.now += 1
        watch.on_heartbeat(heartbeat(step + 1, running=1))
        assert watch.problem(watch.busy(False)) is None
    assert not watch.stalled and watch.seconds_since_progress() == 0.0


def test_something_waiting_on_the_engine_makes_it_busy(clock: Clock) -> None:
    watch = ready_watch(clock)
    watch.on_heartbeat(heartbeat(0))
    assert not watch.busy(waited_on=False)
    assert watch.busy(waited_on=True)
    watch.on_heartbeat(heartbeat(0, loading="m"))
    assert watch.busy(waited_on=False)
