"""The small async interface the gateway sees: generate, abort, status, start, stop.

`EngineClient` supervises one engine process at a time. It routes events to per-request queues, watches
heartbeats and progress, and when the process dies or stalls it ends every affected request at once with
ENGINE_UNAVAILABLE, kills what is left, and starts a new process with backoff and a restart budget.
No MLX here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.ipc import ConnectionClosed
from mlx_backend.process import EngineProcess, describe_exit
from mlx_backend.types import (
    Abort,
    Delta,
    EngineConfig,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Ready,
    Shutdown,
    Started,
)

log = logging.getLogger("mlx_gateway.engine")

GenerationEvent = Started | Delta | Finished
GenerationStream = AsyncGenerator[GenerationEvent, None]  # closing it early aborts the request


class _Pending:
    """One request's event queue and the counts needed to end it on our own (drain deadline)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[GenerationEvent | EngineError] = asyncio.Queue()
        self.held: GenerationEvent | EngineError | None = None  # taken from the queue, not handed out yet
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def track(self, event: GenerationEvent) -> None:
        if isinstance(event, Started):
            self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.cached_tokens
        elif isinstance(event, Delta):
            self.completion_tokens += event.tokens

    async def take(self) -> GenerationEvent | EngineError:
        """The next event. Deltas already waiting are merged into one: a consumer that falls behind (a slow
        client, a busy event loop) catches up in one chunk instead of one per token, and a fast one is
        never delayed."""
        item = self.held if self.held is not None else await self.queue.get()
        self.held = None
        while isinstance(item, Delta) and not self.queue.empty():
            following = self.queue.get_nowait()
            if not isinstance(following, Delta):
                self.held = following
                break
            item = Delta(item.request_id, item.text + following.text, item.tokens + following.tokens)
        return item

    def finished(self, rid: str, finish_reason: str) -> Finished:
        return Finished(rid, finish_reason, self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class EngineState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    RESTARTING = "restarting"
    DOWN = "down"  # restart budget spent: a human must look
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    pid: int | None
    restarts: int
    device: str | None
    last_exit: str | None
    stalled: bool
    seconds_since_progress: float | None
    heartbeat: Heartbeat | None


class EngineObserver(Protocol):
    """What the gateway wants to hear about (metrics, logs); every method must be cheap."""

    def on_heartbeat(self, heartbeat: Heartbeat) -> None: ...
    def on_restart(self, reason: str) -> None: ...
    def on_cancelled(self, finished: Finished) -> None: ...


class Engine(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def generate(self, command: Generate, timeout_s: float | None = None) -> GenerationStream: ...
    def end_all(self, finish_reason: str) -> int: ...
    def status(self) -> EngineStatus: ...

    @property
    def in_flight(self) -> int: ...


@dataclass(frozen=True)
class SupervisionPolicy:
    stall_timeout_s: float = 30.0  # work pending, no progress this long: stalled (killed at 1.5x)
    load_timeout_s: float = 600.0  # a single model load may take this long
    heartbeat_timeout_s: float = 3.0  # no heartbeat this long: the process is frozen (SIGSTOP, swap death)
    ready_timeout_s: float = 120.0  # a fresh process must say Ready within this
    restart_budget: int = 10  # restarts per rolling hour, then DOWN
    shutdown_timeout_s: float = 10.0


def unavailable(state: EngineState) -> EngineError:
    """The error a request gets when the engine cannot take it, saying why in words."""
    detail = {
        EngineState.STARTING: "the engine is starting",
        EngineState.RESTARTING: "the engine is restarting after a failure",
        EngineState.DOWN: "the engine failed too often and stays down until an operator restarts the server",
        EngineState.STOPPED: "the server is shutting down",
        EngineState.UP: "the engine connection was lost",
    }[state]
    return EngineError(EngineErrorCode.ENGINE_UNAVAILABLE, f"Model engine unavailable: {detail}.")


class EngineClient:
    def __init__(
        self,
        config: EngineConfig,
        observer: EngineObserver,
        policy: SupervisionPolicy | None = None,
        extra_env: dict[str, str] | None = None,
        worker_module: str = "mlx_backend.worker",
    ) -> None:
        self._config = config
        self._worker_module = worker_module
        self._observer = observer
        self._policy = policy or SupervisionPolicy()
        self._extra_env = extra_env
        self._state = EngineState.STARTING
        self._process: EngineProcess | None = None
        self._ready: Ready | None = None
        self._heartbeat: Heartbeat | None = None
        self._last_heartbeat_at = 0.0
        self._last_progress: tuple[int, float] = (0, 0.0)  # (counter, monotonic time it last changed)
        self._requests: dict[str, _Pending] = {}
        self._aborted: set[str] = set()
        self._restart_times: deque[float] = deque()
        self._restarts = 0
        self._last_exit: str | None = None
        self._stalled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._up = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start supervising; returns at once (the first process comes up in the background)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def wait_until_up(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self._up.is_set()

    async def stop(self) -> None:
        """Ask the engine to clear its cache and exit; kill it if it does not."""
        previous = self._state
        self._state = EngineState.STOPPED
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._fail_all("the server is shutting down")
        process = self._process
        if process is None or process.returncode is not None:
            return
        if previous == EngineState.UP and process.channel is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                process.channel.send(Shutdown())
                log.info("engine asked to clear its model cache and exit")
        code = await process.stop(self._policy.shutdown_timeout_s)
        log.info("engine process stopped: %s", describe_exit(code))

    # -- requests -------------------------------------------------------------------------------------

    async def generate(self, command: Generate, timeout_s: float | None = None) -> GenerationStream:
        """Events of one request; raises EngineError on failure. Leaving early aborts the request."""
        process = self._process
        if self._state != EngineState.UP or process is None or process.channel is None:
            raise self._unavailable()
        rid = command.request_id
        pending = _Pending()
        self._requests[rid] = pending
        deadline = time.monotonic() + timeout_s if timeout_s else None
        finished = False
        try:
            process.channel.send(command)
            while True:
                item = await self._next(pending, deadline, timeout_s)
                if isinstance(item, EngineError | Finished):
                    # Settle before handing out the last event: a consumer may stop iterating right there.
                    finished = True
                    self._requests.pop(rid, None)
                    if isinstance(item, EngineError):
                        raise item
                    yield item
                    return
                yield item
        except ConnectionClosed:
            finished = True
            raise self._unavailable() from None
        finally:
            self._requests.pop(rid, None)
            if not finished:
                self._abort(rid, process)

    @staticmethod
    async def _next(
        pending: _Pending, deadline: float | None, timeout_s: float | None
    ) -> GenerationEvent | EngineError:
        if deadline is None:
            return await pending.take()
        try:
            return await asyncio.wait_for(pending.take(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return EngineError(
                EngineErrorCode.REQUEST_TIMEOUT, f"The request ran longer than the {timeout_s:g}s request timeout."
            )

    def end_all(self, finish_reason: str) -> int:
        """End every request now with a final Finished (drain deadline); the engine drops their work."""
        process = self._process
        for rid, pending in list(self._requests.items()):
            pending.queue.put_nowait(pending.finished(rid, finish_reason))
            if process is not None:
                self._abort(rid, process, count_as_cancelled=False)
        return len(self._requests)

    def _abort(self, rid: str, process: EngineProcess, *, count_as_cancelled: bool = True) -> None:
        if process is self._process and process.channel and self._state == EngineState.UP:
            if count_as_cancelled:
                self._aborted.add(rid)
            with contextlib.suppress(ConnectionClosed, OSError):
                process.channel.send(Abort(rid))

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def status(self) -> EngineStatus:
        since = None
        if self._state == EngineState.UP and self._last_progress[1]:
            since = round(time.monotonic() - self._last_progress[1], 3)
        return EngineStatus(
            state=self._state,
            pid=self._process.pid if self._process else None,
            restarts=self._restarts,
            device=self._ready.device if self._ready else None,
            last_exit=self._last_exit,
            stalled=self._stalled,
            seconds_since_progress=since,
            heartbeat=self._heartbeat if self._state == EngineState.UP else None,
        )

    def _unavailable(self) -> EngineError:
        return unavailable(self._state)

    def _fail_all(self, reason: str) -> None:
        error = EngineError(
            EngineErrorCode.ENGINE_UNAVAILABLE, f"Model engine unavailable: {reason}; the request was ended."
        )
        for pending in self._requests.values():
            pending.queue.put_nowait(error)
        self._requests.clear()
        self._aborted.clear()

    # -- supervision ----------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 0.5
        while True:
            reason = await self._run_one_process()
            if self._state == EngineState.STOPPED:
                return
            self._last_exit = reason
            self._up.clear()
            self._state = EngineState.RESTARTING
            self._fail_all(f"the engine process {reason}")
            self._observer.on_restart(reason)
            if not self._within_budget():
                self._state = EngineState.DOWN
                log.error(
                    "engine restart budget spent (%d in the last hour); the engine stays down. "
                    "Last failure: %s. Restart the server once the cause is fixed.",
                    self._policy.restart_budget, reason,
                )
                return
            log.warning("engine process %s; restarting in %.1fs", reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if self._state == EngineState.UP:
                backoff = 0.5

    def _within_budget(self) -> bool:
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > 3600:
            self._restart_times.popleft()
        if len(self._restart_times) >= self._policy.restart_budget:
            return False
        self._restart_times.append(now)
        self._restarts += 1
        return True

    async def _run_one_process(self) -> str:
        """Run a process until it dies or must be killed; returns why it ended."""
        process = EngineProcess(self._config, self._extra_env, self._worker_module)
        self._process = process
        self._ready = None
        self._heartbeat = None
        self._stalled = False
        try:
            await process.spawn()
        except OSError as exc:
            return f"could not be started ({exc})"
        self._last_heartbeat_at = time.monotonic()
        self._last_progress = (0, time.monotonic())
        reader = asyncio.create_task(self._read_events(process), name="engine-reader")
        waiter = asyncio.create_task(process.wait(), name="engine-wait")
        try:
            while True:
                done, _ = await asyncio.wait({reader, waiter}, timeout=0.1)
                if done:
                    break
                problem = self._check_health()
                if problem:
                    log.error("engine %s; killing it (pid %s)", problem, process.pid)
                    self._mark_not_up()
                    self._fail_all(f"the engine {problem}")
                    process.kill()
                    await process.wait()
                    return problem
            self._mark_not_up()
            if waiter in done:
                return f"{describe_exit(process.returncode)}"
            # The socket closed first: the process is dying or broke the protocol; make sure it is gone.
            self._fail_all("the engine connection was lost")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), 1.0)
            if process.returncode is None:
                process.kill()
                await process.wait()
            return f"closed its connection and {describe_exit(process.returncode)}"
        except asyncio.CancelledError:
            raise
        finally:
            reader.cancel()
            if self._state == EngineState.STOPPED:
                waiter.cancel()

    def _mark_not_up(self) -> None:
        """From the moment a failure is seen, nobody may be told the engine is up."""
        if self._state != EngineState.STOPPED:
            self._state = EngineState.RESTARTING
        self._up.clear()

    def _check_health(self) -> str | None:
        now = time.monotonic()
        if self._ready is None:
            if now - self._last_heartbeat_at > self._policy.ready_timeout_s:
                return f"did not become ready within {self._policy.ready_timeout_s:.0f}s"
            return None
        if now - self._last_heartbeat_at > self._policy.heartbeat_timeout_s:
            return f"sent no heartbeat for {now - self._last_heartbeat_at:.1f}s (frozen)"
        heartbeat = self._heartbeat
        busy = bool(self._requests) or (heartbeat is not None and bool(heartbeat.running or heartbeat.waiting))
        limit = self._policy.load_timeout_s if heartbeat and heartbeat.loading else self._policy.stall_timeout_s
        idle_for = now - self._last_progress[1]
        self._stalled = busy and idle_for > limit
        # Report "stalled" first (health 503), kill a little later: a stall can still resolve itself
        # (one huge prefill chunk on a slow machine), and the operator sees the state either way.
        if self._stalled and idle_for > limit + max(1.0, limit / 2):
            return f"made no progress for {idle_for:.1f}s with work pending (stalled)"
        return None

    async def _read_events(self, process: EngineProcess) -> None:
        assert process.channel is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                event = await process.channel.receive()
                if isinstance(event, Heartbeat):
                    self._on_heartbeat(event)
                elif isinstance(event, Ready):
                    self._ready = event
                    self._state = EngineState.UP
                    self._last_heartbeat_at = time.monotonic()
                    self._up.set()
                    log.info("engine ready (pid %d, device %s, mlx %s, mlx-lm %s)",
                             event.pid, event.device, event.mlx_version, event.mlx_lm_version)
                else:
                    self._route(event)

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        now = time.monotonic()
        self._last_heartbeat_at = now
        if heartbeat.progress != self._last_progress[0]:
            self._last_progress = (heartbeat.progress, now)
        self._heartbeat = heartbeat
        self._observer.on_heartbeat(heartbeat)

    def _route(self, event: Started | Delta | Finished | Failed) -> None:
        pending = self._requests.get(event.request_id)
        if pending is None:
            if isinstance(event, Finished) and event.request_id in self._aborted:
                self._aborted.discard(event.request_id)
                self._observer.on_cancelled(event)
            elif isinstance(event, Failed):
                self._aborted.discard(event.request_id)
            return
        if isinstance(event, Failed):
            pending.queue.put_nowait(EngineError.from_wire(event.code, event.message, event.param))
            return
        pending.track(event)
        pending.queue.put_nowait(event)
