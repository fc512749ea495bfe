"""What to do after one check: a pure function, so every branch is unit-tested without processes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    OK = "ok"  # the API answers
    MISS = "miss"  # alive but not answering; not yet enough misses to call it hung
    RESTART = "restart"
    GIVE_UP = "give_up"  # the budget is spent: stop restarting and leave a marker for a human
    OBSERVE = "observe"  # failed, but restarting is not ours to do (gave up earlier, or systemd owns it)


@dataclass(frozen=True)
class Observation:
    pid: int | None  # the server's pid when one is known and that process exists
    live: bool  # GET /health/live answered 200 within the timeout
    managed_by: str | None = None  # a systemd unit that owns the server: then it is the restart authority


@dataclass(frozen=True)
class Decision:
    action: Action
    misses: int  # consecutive misses after this check
    reason: str


def decide(
    obs: Observation, misses: int, *, misses_allowed: int, restarts_in_window: int, max_restarts: int,
    gave_up: bool,
) -> Decision:
    if obs.live:
        return Decision(Action.OK, 0, "the API answers")
    if obs.pid is None:
        misses, reason = 0, "the server process is not running"
    else:
        misses += 1
        if misses < misses_allowed:
            return Decision(Action.MISS, misses, f"pid {obs.pid} alive but /health/live did not answer "
                                                 f"({misses} of {misses_allowed} misses)")
        reason = f"hung: pid {obs.pid} alive but /health/live missed {misses} checks in a row"
    if obs.managed_by:
        return Decision(Action.OBSERVE, misses, f"{reason}; {obs.managed_by} is the restart authority")
    if gave_up:
        return Decision(Action.OBSERVE, misses,
                        f"{reason}; restarts are off until 'mlx-gateway watchdog --reset'")
    if restarts_in_window >= max_restarts:
        return Decision(Action.GIVE_UP, misses,
                        f"{reason}; {restarts_in_window} restarts in the window (budget {max_restarts})")
    return Decision(Action.RESTART, misses, reason)
