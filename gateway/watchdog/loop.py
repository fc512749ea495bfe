"""The watchdog loop: check, decide, act, record. One check every interval; a restart is one check's work."""

from __future__ import annotations

import logging
import os
import threading
import time

from gateway.watchdog import probe
from gateway.watchdog.config import WatchdogConfig
from gateway.watchdog.decide import Action, Decision, Observation, decide
from gateway.watchdog.process import ServerControl, StartError, managed_by_systemd, stop
from gateway.watchdog.state import StateDir

log = logging.getLogger("mlx_gateway.watchdog")


def _fields(event: str, **more: object) -> dict[str, object]:
    return {"fields": {"event": event, **more}}


class Watchdog:
    def __init__(self, config: WatchdogConfig, server: ServerControl, state: StateDir) -> None:
        self.config = config
        self.server = server
        self.state = state
        self.stopping = threading.Event()
        self.misses = 0
        self._first_check = True
        self._health: str | None = None
        self._last_note: str | None = None  # repeated warnings are logged once, until they change

    def run(self) -> None:
        c = self.config
        log.info("watchdog started (pid %d): probing %s every %gs, hung after %d misses, at most %d restarts "
                 "per %gs, state in %s", os.getpid(), c.url, c.interval_s, c.misses,
                 c.max_restarts, c.window_s, c.state_dir, extra=_fields("watchdog_started"))
        if c.launchd_job:
            # launchd starts the server at load (RunAtLoad): give it one interval before judging it.
            self.stopping.wait(c.interval_s)
        while not self.stopping.is_set():
            began = time.monotonic()
            self.check_once()
            self.stopping.wait(max(0.0, c.interval_s - (time.monotonic() - began)))
        log.info("watchdog stopping; the server is left running", extra=_fields("watchdog_stopped"))

    def check_once(self) -> Decision:
        c = self.config
        pid = self.server.pid()
        marker = self.state.gave_up()
        restarts = self.state.ledger.count(c.window_s)
        obs = Observation(pid=pid, live=probe.live(c.url, c.timeout_s),
                          managed_by=managed_by_systemd(pid) if pid else None)
        decision = decide(obs, self.misses, misses_allowed=c.misses, restarts_in_window=restarts,
                          max_restarts=c.max_restarts, gave_up=marker is not None)
        # The first start is free only when this watchdog finds no server at its first check, launchd did
        # not start one (its RunAtLoad is the first start there), and the window holds no start at all: a
        # watchdog restarted soon after a start is recovering from a failure, so a boot loop stays bounded.
        first_start = (self._first_check and pid is None and not c.launchd_job
                       and self.state.ledger.quiet(c.window_s))
        self._first_check = False
        self.misses = decision.misses
        result = decision.action.value
        if decision.action is Action.OK:
            self._note_health(pid)
            if marker is not None:
                self._once(logging.WARNING, "the server answers, but restarts stay off until "
                           "'mlx-gateway watchdog --reset'", "gave_up")
            else:
                self._last_note = None
        elif decision.action is Action.MISS:
            log.warning("%s", decision.reason, extra=_fields("miss", pid=pid, misses=decision.misses))
        elif decision.action is Action.OBSERVE:
            self._once(logging.ERROR, decision.reason, "observe")
        elif decision.action is Action.GIVE_UP:
            self.state.give_up(decision.reason, restarts)
            log.critical("GIVING UP: %s. The server stays down until a human fixes the cause and runs "
                         "'mlx-gateway watchdog --reset' (marker: %s)", decision.reason,
                         self.state.path / "gave-up.json", extra=_fields("gave_up", restarts=restarts))
            self._last_note = decision.reason
        else:
            started = self.restart(pid, decision.reason, restarts, counted=not first_start)
            result = "restarted" if started else "restart_failed"
        self.state.write_state(last_check_at=time.time(), last_check_result=result,
                               server_pid=self.server.pid(), server_health=self._health,
                               consecutive_misses=self.misses, url=c.url)
        return decision

    def restart(self, pid: int | None, reason: str, restarts_before: int, *, counted: bool = True) -> bool:
        c = self.config
        n = restarts_before + 1
        if counted:
            log.warning("starting the server (restart %d of %d allowed per %gs): %s", n, c.max_restarts,
                        c.window_s, reason, extra=_fields("restart", pid=pid, start=n, reason=reason))
        else:
            log.info("starting the server (first start, not counted against the budget of %d restarts per "
                     "%gs): %s", c.max_restarts, c.window_s, reason, extra=_fields("first_start", reason=reason))
        # Before acting: a watchdog that dies mid-restart still counted it.
        self.state.ledger.record(reason, counted=counted)
        if pid is not None:
            how = stop(pid, c.stop_timeout_s, self.server.reap)
            log.info("stopped pid %d: %s", pid, how, extra=_fields("stopped", pid=pid, how=how))
        began = time.monotonic()
        try:
            self.server.start()
        except StartError as exc:
            log.error("restart failed: %s", exc, extra=_fields("restart_failed", reason=str(exc)))
            return False
        failure = self._wait_live(began + c.start_timeout_s)
        took = time.monotonic() - began
        if failure is None:
            self._health = None
            self._note_health(new := self.server.pid())
            log.info("server is back after %.1fs: pid %s, /health %s", took, new, self._health,
                     extra=_fields("recovered", pid=new, seconds=round(took, 3), health=self._health))
            return True
        log.error("restart failed after %.1fs: %s", took, failure,
                  extra=_fields("restart_failed", seconds=round(took, 3), reason=failure))
        if (stuck := self.server.pid()) is not None:
            stop(stuck, c.stop_timeout_s, self.server.reap)  # hung at start: the next check starts afresh
        return False

    def _wait_live(self, deadline: float) -> str | None:
        """None once the new server answers; otherwise why it did not."""
        while True:
            if self.server.pid() is None:
                return f"the server exited while starting ({self.server.exit_note()})"
            remaining = deadline - time.monotonic()
            if probe.live(self.config.url, min(self.config.timeout_s, max(remaining, 0.1))):
                return None
            if remaining <= 0:
                return f"/health/live did not answer within {self.config.start_timeout_s:g}s"
            if self.stopping.wait(0.2):
                return "the watchdog was asked to stop"

    def _note_health(self, pid: int | None) -> None:
        """Log /health's status when it changes; restarts never depend on it (the gateway owns its engine)."""
        code, body = probe.health(self.config.url, self.config.timeout_s)
        status = str(body.get("status")) if body else f"http {code}" if code else "no answer"
        if status != self._health:
            reason = body.get("reason") if body else None
            log.info("server /health: %s%s", status, f" ({reason})" if reason else "",
                     extra=_fields("health", pid=pid, status=status))
        self._health = status

    def _once(self, level: int, message: str, event: str) -> None:
        if message != self._last_note:
            log.log(level, "%s", message, extra=_fields(event))
            self._last_note = message
