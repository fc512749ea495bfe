"""How the gateway judges the engine process (`ProcessWatch`: ready in time, heartbeats, the stall clock) and how
often it may start a new one (`RestartBudget`), under one `SupervisionPolicy`. No MLX here."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from mlx_backend.contract import Heartbeat, Ready


@dataclass(frozen=True)
class SupervisionPolicy:
    stall_timeout_s: float = 30.0  # busy with no progress this long: stalled (killed at 1.5x)
    load_timeout_s: float = 600.0  # a single model load may take this long
    heartbeat_timeout_s: float = 3.0  # no heartbeat this long: the process is frozen (SIGSTOP, swap death)
    # While a model loads, native code that holds the GIL (a tokenizer with a huge vocabulary parsing, say)
    # can keep the heartbeat thread from running for seconds: the engine is busy, not frozen.
    loading_heartbeat_timeout_s: float = 60.0
    ready_timeout_s: float = 120.0  # a fresh process must say Ready within this
    restart_budget: int = 10  # restarts per rolling hour, then DOWN
    healthy_after_s: float = 60.0  # a process up this long was healthy: the restart backoff starts over
    shutdown_timeout_s: float = 10.0
    # Groups: an idle rank 0 steps every GroupConfig.tick_s, so progress stopping while idle means a rank
    # is stuck or a link between ranks is lost. None (one process): idle time is never judged.
    idle_progress_timeout_s: float | None = None


class RestartBudget:
    """At most `limit` restarts in any rolling hour."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._times: deque[float] = deque()
        self.restarts = 0

    def take(self) -> bool:
        """Count one more restart if the last hour's budget allows it; False once it is spent."""
        now = time.monotonic()
        while self._times and now - self._times[0] > 3600:
            self._times.popleft()
        if len(self._times) >= self._limit:
            return False
        self._times.append(now)
        self.restarts += 1
        return True


class ProcessWatch:
    """One engine process judged by what it sends: Ready within the ready timeout, heartbeats (silence means
    frozen; a longer silence is allowed while a model loads), and while it has work, its progress counter (the
    stall clock: stalled is reported first, killed a little later)."""

    def __init__(self, policy: SupervisionPolicy) -> None:
        self._policy = policy
        self.ready: Ready | None = None
        self.heartbeat: Heartbeat | None = None
        self.stalled = False
        self._last_heartbeat_at = 0.0
        self._load_announced = False  # a Loading event came after the last heartbeat
        # The stall clock: (progress counter, when it last moved or when work began after a quiet spell).
        self._last_progress: tuple[int, float] = (0, 0.0)

    def new_process(self) -> None:
        """A process is about to be started: nothing is known of it yet."""
        self.ready = None
        self.heartbeat = None
        self.stalled = False

    def spawned(self) -> None:
        """The process runs: the ready timeout starts now, and so does the stall clock."""
        self._last_heartbeat_at = time.monotonic()
        self._last_progress = (0, time.monotonic())

    def on_ready(self, ready: Ready) -> None:
        self.ready = ready
        self._last_heartbeat_at = time.monotonic()
        self._last_progress = (self._last_progress[0], self._last_heartbeat_at)  # starting: no stall

    def on_loading(self) -> None:
        self._load_announced = True

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        now = time.monotonic()
        self._last_heartbeat_at = now
        self._load_announced = False  # the heartbeat says itself whether a load runs
        # Progress, or the end of start-up (bounded by the load timeout meanwhile): waiting work gets a whole
        # stall timeout from here, not one already spent on the engine's imports.
        if heartbeat.progress != self._last_progress[0] or (self._starting() and not heartbeat.starting):
            self._last_progress = (heartbeat.progress, now)
        self.heartbeat = heartbeat

    def busy(self, waited_on: bool) -> bool:
        """Whether the engine has work: something waits on it (`waited_on`), or its last heartbeat says so."""
        heartbeat = self.heartbeat
        if waited_on:
            return True
        return heartbeat is not None and bool(heartbeat.running or heartbeat.waiting or heartbeat.loading)

    def seconds_since_progress(self) -> float:
        return round(time.monotonic() - self._last_progress[1], 3)

    def _loading(self) -> bool:
        """Whether the engine said a model is loading: in its last heartbeat, or in a Loading event since."""
        return self._load_announced or (self.heartbeat is not None and self.heartbeat.loading is not None)

    def _starting(self) -> bool:
        """Whether the engine said it is still importing mlx-lm and finding models (after Ready): a request
        waiting meanwhile is judged like one waiting for a load, not as a stall."""
        return self.heartbeat is not None and self.heartbeat.starting

    def _heartbeat_limit(self) -> float:
        """The silence that means frozen: longer while a model loads."""
        if self._loading():
            return max(self._policy.heartbeat_timeout_s, self._policy.loading_heartbeat_timeout_s)
        return self._policy.heartbeat_timeout_s

    def problem(self, busy: bool) -> str | None:
        """Why the process must be killed now, if it must; `busy`: whether it has work (see `busy`)."""
        now = time.monotonic()
        if self.ready is None:
            if now - self._last_heartbeat_at > self._policy.ready_timeout_s:
                return f"did not become ready within {self._policy.ready_timeout_s:.0f}s"
            return None
        silent_for = now - self._last_heartbeat_at
        if silent_for > self._heartbeat_limit():
            return f"sent no heartbeat for {silent_for:.1f}s (frozen)"
        if not busy:
            idle_limit = self._policy.idle_progress_timeout_s
            if idle_limit is not None:  # a group steps while idle too
                idle_for = now - self._last_progress[1]
                self.stalled = False
                if idle_for > idle_limit:
                    return f"stalled while idle: no progress for {idle_for:.1f}s (a rank is stuck or a link " \
                           "between ranks is lost)"
                return None
            # Only busy time is judged: while idle the clock keeps up, so work that starts after a long
            # quiet spell gets the whole stall timeout, like work that starts a second after the last.
            self._last_progress = (self._last_progress[0], now)
            self.stalled = False
            return None
        limit = self._policy.load_timeout_s if self._loading() or self._starting() else self._policy.stall_timeout_s
        idle_for = now - self._last_progress[1]
        self.stalled = idle_for > limit
        # Report "stalled" first (health 503), kill a little later: a stall can still resolve itself
        # (one huge prefill chunk on a slow machine), and the operator sees the state either way.
        if self.stalled and idle_for > limit + max(1.0, limit / 2):
            return f"made no progress for {idle_for:.1f}s with work pending (stalled)"
        return None
