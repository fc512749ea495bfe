"""Every branch of the decision after one check."""

from __future__ import annotations

from gateway.watchdog.decide import Action, Decision, Observation, decide


def run(obs: Observation, misses: int = 0, restarts: int = 0, gave_up: bool = False) -> Decision:
    return decide(obs, misses, misses_allowed=3, restarts_in_window=restarts, max_restarts=5, gave_up=gave_up)


def test_live_is_ok_and_resets_misses() -> None:
    assert run(Observation(pid=10, live=True), misses=2) == Decision(Action.OK, 0, "the API answers")


def test_live_without_a_known_pid_is_still_ok() -> None:
    assert run(Observation(pid=None, live=True)).action is Action.OK


def test_dead_process_restarts_at_once() -> None:
    decision = run(Observation(pid=None, live=False))
    assert decision.action is Action.RESTART
    assert "not running" in decision.reason


def test_alive_but_silent_is_a_miss_until_the_limit() -> None:
    first = run(Observation(pid=10, live=False))
    assert (first.action, first.misses) == (Action.MISS, 1)
    second = run(Observation(pid=10, live=False), misses=first.misses)
    assert (second.action, second.misses) == (Action.MISS, 2)
    third = run(Observation(pid=10, live=False), misses=second.misses)
    assert (third.action, third.misses) == (Action.RESTART, 3)
    assert third.reason.startswith("hung")


def test_budget_spent_gives_up() -> None:
    assert run(Observation(pid=None, live=False), restarts=4).action is Action.RESTART
    decision = run(Observation(pid=None, live=False), restarts=5)
    assert decision.action is Action.GIVE_UP
    assert "5 restarts in the window" in decision.reason


def test_after_giving_up_only_observe() -> None:
    decision = run(Observation(pid=None, live=False), restarts=0, gave_up=True)
    assert decision.action is Action.OBSERVE
    assert "--reset" in decision.reason
    assert run(Observation(pid=10, live=True), gave_up=True).action is Action.OK


def test_a_server_systemd_owns_is_never_restarted_here() -> None:
    obs = Observation(pid=10, live=False, managed_by="systemd unit mlx-gateway.service")
    decision = run(obs, misses=2)
    assert decision.action is Action.OBSERVE
    assert "systemd unit mlx-gateway.service is the restart authority" in decision.reason
    assert run(obs).action is Action.MISS  # misses are still counted and logged
