"""The small interface the gateway sees: submit, status, start, stop.

`EngineClient` supervises one engine process at a time. It routes events to per-request handles
(`EngineRequest`, mlx_backend/engine_request.py), watches heartbeats and progress, and when the process
dies or stalls it ends every affected request at once with ENGINE_UNAVAILABLE, kills what is left, and
starts a new process with backoff and a restart budget. Once the budget is spent it stays DOWN and tells
its observer, so the gateway can exit and let the service manager (launchd, systemd, the watchdog)
restart the whole server. No MLX here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from mlx_backend import timeline
from mlx_backend.engine_request import EngineRequest
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.group import GroupProcess, GroupSpec, GroupStatus
from mlx_backend.ipc import ConnectionClosed
from mlx_backend.process import EngineProcess, describe_exit
from mlx_backend.types import (
    Abort,
    CountPrompt,
    Delta,
    EngineConfig,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Hello,
    Loading,
    ModelControl,
    ModelControlDone,
    ModelEvent,
    PromptCount,
    RankHeartbeat,
    Ready,
    Shutdown,
    Started,
    Wake,
)

log = logging.getLogger("mlx_gateway.engine")

class EngineState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    RESTARTING = "restarting"
    DOWN = "down"  # restart budget spent: the gateway exits so the service manager restarts everything
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    pid: int | None
    restarts: int
    device: str | None
    last_exit: str | None
    stalled: bool
    seconds_since_progress: float | None  # while busy only: idle time is not a lack of progress
    heartbeat: Heartbeat | None
    group: GroupStatus | None = None  # the engine as a distributed group: each rank


ControlAction = Literal["load", "unload", "pin", "unpin"]


class EngineObserver(Protocol):
    """What the gateway wants to hear about (metrics, logs, giving up); every method must be cheap."""

    def on_heartbeat(self, heartbeat: Heartbeat) -> None: ...
    def on_restart(self, reason: str) -> None: ...
    def on_cancelled(self, finished: Finished) -> None: ...
    def on_down(self, reason: str) -> None: ...
    def on_model_event(self, event: ModelEvent) -> None: ...


class Engine(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def submit(self, command: Generate) -> EngineRequest: ...
    async def count_prompt(self, command: Generate) -> int: ...
    def status(self) -> EngineStatus: ...
    async def control(self, action: ControlAction, model: str) -> None: ...

    @property
    def in_flight(self) -> int: ...


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


_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


def unavailable(state: EngineState) -> EngineError:
    """The error a request gets when the engine cannot take it, saying why in words."""
    detail = {
        EngineState.STARTING: "the engine is starting",
        EngineState.RESTARTING: "the engine is restarting after a failure",
        EngineState.DOWN: "the engine failed too often; the server is restarting",
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
        group: GroupSpec | None = None,
    ) -> None:
        self._config = config
        self._group = group  # set: every process is a GroupProcess of config.group.size ranks
        self._worker_module = worker_module
        self._observer = observer
        self._policy = policy or SupervisionPolicy()
        self._extra_env = extra_env
        self._state = EngineState.STARTING
        self._process: EngineProcess | GroupProcess | None = None
        self._ready: Ready | None = None
        self._heartbeat: Heartbeat | None = None
        self._last_heartbeat_at = 0.0
        self._load_announced = False  # a Loading event came after the last heartbeat
        # The stall clock: (progress counter, when it last moved or when work began after a quiet spell).
        self._last_progress: tuple[int, float] = (0, 0.0)
        self._requests: dict[str, EngineRequest] = {}
        self._counts: dict[str, asyncio.Future[int]] = {}  # CountPrompt requests waiting for their answer
        self._aborted: set[str] = set()
        self._restart_times: deque[float] = deque()
        self._restarts = 0
        self._last_exit: str | None = None
        self._stalled = False
        self._supervisor: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._controls: dict[str, asyncio.Future[None]] = {}  # admin commands waiting for their answer
        self._control_ids = itertools.count(1)
        self._pin_changes: dict[str, bool] = {}  # pins made or undone at run time: kept across restarts

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

    def submit(self, command: Generate) -> EngineRequest:
        """Send a request to the engine; its events arrive on the returned handle. Raises EngineError when
        the engine cannot take it. The caller owns the handle: it reads it to its end or interrupts it."""
        process = self._process
        if self._state != EngineState.UP or process is None or process.channel is None:
            raise self._unavailable()
        rid = command.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already in flight")  # ids are the gateway's to keep unique
        try:
            process.channel.send(command)
        except (ConnectionClosed, OSError):
            raise self._unavailable() from None
        request = EngineRequest(rid, lambda r: self._abort(r, process), command.n)
        self._requests[rid] = request
        return request

    async def count_prompt(self, command: Generate) -> int:
        """The prompt tokens `command` would run with, counted by the engine without running it (loading its
        model if needed). Raises EngineError. Cancelling the wait abandons the answer."""
        process = self._process
        if self._state != EngineState.UP or process is None or process.channel is None:
            raise self._unavailable()
        rid = command.request_id
        if rid in self._requests or rid in self._counts:
            raise ValueError(f"request id {rid} is already in flight")
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._counts[rid] = answer
        try:
            process.channel.send(CountPrompt(command))
        except (ConnectionClosed, OSError):
            self._counts.pop(rid, None)
            raise self._unavailable() from None
        try:
            return await answer
        finally:
            self._counts.pop(rid, None)

    def _abort(self, rid: str, process: EngineProcess | GroupProcess) -> None:
        """Its owner ended a request the engine still runs: tell the engine, and count what it wasted."""
        if self._requests.pop(rid, None) is None:
            return
        if process is self._process and process.channel and self._state == EngineState.UP:
            self._aborted.add(rid)
            with contextlib.suppress(ConnectionClosed, OSError):
                process.channel.send(Abort(rid))

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def status(self) -> EngineStatus:
        since = None
        if self._state == EngineState.UP and self._busy():
            since = round(time.monotonic() - self._last_progress[1], 3)
        process = self._process
        return EngineStatus(
            state=self._state,
            pid=process.pid if process else None,
            restarts=self._restarts,
            device=self._ready.device if self._ready else None,
            last_exit=self._last_exit,
            stalled=self._stalled,
            seconds_since_progress=since,
            heartbeat=self._heartbeat if self._state == EngineState.UP else None,
            group=process.status(self._policy.heartbeat_timeout_s) if isinstance(process, GroupProcess) else None,
        )

    def _unavailable(self) -> EngineError:
        return unavailable(self._state)

    # -- operators ------------------------------------------------------------------------------------

    async def control(self, action: ControlAction, model: str) -> None:
        """Load, unload, pin or unpin a model; returns once the engine did it (a load: once the model is
        ready). Raises EngineError: the load's own error, or ENGINE_UNAVAILABLE if the engine goes away.
        Pins survive engine restarts: a new engine process starts with them."""
        process = self._process
        if self._state != EngineState.UP or process is None or process.channel is None:
            raise self._unavailable()
        request_id = f"control-{next(self._control_ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._controls[request_id] = future
        try:
            process.channel.send(ModelControl(request_id, action, model))
        except (ConnectionClosed, OSError):
            self._controls.pop(request_id, None)
            raise self._unavailable() from None
        try:
            await future
        finally:
            self._controls.pop(request_id, None)
        if action in ("pin", "unpin", "unload"):
            self._pin_changes[model] = action == "pin"

    def _config_for_new_process(self) -> EngineConfig:
        pinned = dict.fromkeys(self._config.pinned)
        for model, pin in self._pin_changes.items():
            if pin:
                pinned[model] = None
            else:
                pinned.pop(model, None)
        return msgspec.structs.replace(self._config, pinned=tuple(pinned))

    def _fail_all(self, reason: str) -> None:
        error = EngineError(
            EngineErrorCode.ENGINE_UNAVAILABLE, f"Model engine unavailable: {reason}; the request was ended."
        )
        for request in self._requests.values():
            request.deliver(error)
        self._requests.clear()
        for answer in self._counts.values():
            if not answer.done():
                answer.set_exception(error)
        self._counts.clear()
        self._aborted.clear()
        for future in self._controls.values():
            if not future.done():
                future.set_exception(error)

    # -- supervision ----------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while True:
            began = time.monotonic()
            reason = await self._run_one_process()
            if self._state == EngineState.STOPPED:
                return
            self._last_exit = reason
            self._up.clear()
            self._state = EngineState.RESTARTING
            self._fail_all(f"the engine process {reason}")
            self._observer.on_restart(reason)
            if time.monotonic() - began >= self._policy.healthy_after_s:
                backoff = _FIRST_BACKOFF_S  # it ran well for a while: this failure starts a new series
            if not self._within_budget():
                self._state = EngineState.DOWN
                log.error(
                    "engine restart budget spent (%d in the last hour); giving up on the engine. "
                    "Last failure: %s.", self._policy.restart_budget, reason,
                )
                self._observer.on_down(reason)
                return
            log.warning("engine process %s; restarting in %.1fs", reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

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
        config = self._config_for_new_process()
        process: EngineProcess | GroupProcess
        if self._group is not None:
            process = GroupProcess(config, self._group, self._extra_env, self._worker_module)
        else:
            process = EngineProcess(config, self._extra_env, self._worker_module)
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
                problem = self._check_health() or process.problem(
                    self._policy.heartbeat_timeout_s, self._policy.ready_timeout_s)
                if problem:
                    log.error("engine %s; killing it (pid %s)", problem, process.pid)
                    self._mark_not_up()
                    self._fail_all(f"the engine {problem}")
                    process.kill()
                    await process.wait()
                    return problem
            self._mark_not_up()
            if waiter in done:
                return process.describe()
            # The socket closed first. Most often the process is dying at this moment: a short wait lets the
            # requests be told the cause (killed by SIGKILL, say), not only that the socket closed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), 0.2)
            if process.returncode is not None:
                return process.describe()
            # Alive without its socket: it broke the protocol; make sure it is gone.
            self._fail_all("the engine connection was lost")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), 1.0)
            if process.returncode is None:
                process.kill()
                await process.wait()
            return f"closed its connection and {process.describe()}"
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

    def _busy(self) -> bool:
        heartbeat = self._heartbeat
        if self._requests or self._counts or self._controls:
            return True
        return heartbeat is not None and bool(heartbeat.running or heartbeat.waiting or heartbeat.loading)

    def _loading(self) -> bool:
        """Whether the engine said a model is loading: in its last heartbeat, or in a Loading event since."""
        return self._load_announced or (self._heartbeat is not None and self._heartbeat.loading is not None)

    def _starting(self) -> bool:
        """Whether the engine said it is still importing mlx-lm and finding models (after Ready): a request
        waiting meanwhile is judged like one waiting for a load, not as a stall."""
        return self._heartbeat is not None and self._heartbeat.starting

    def _heartbeat_limit(self) -> float:
        """The silence that means frozen: longer while a model loads."""
        if self._loading():
            return max(self._policy.heartbeat_timeout_s, self._policy.loading_heartbeat_timeout_s)
        return self._policy.heartbeat_timeout_s

    def _check_health(self) -> str | None:
        now = time.monotonic()
        if self._ready is None:
            if now - self._last_heartbeat_at > self._policy.ready_timeout_s:
                return f"did not become ready within {self._policy.ready_timeout_s:.0f}s"
            return None
        silent_for = now - self._last_heartbeat_at
        if silent_for > self._heartbeat_limit():
            return f"sent no heartbeat for {silent_for:.1f}s (frozen)"
        if not self._busy():
            idle_limit = self._policy.idle_progress_timeout_s
            if idle_limit is not None:  # a group steps while idle too
                idle_for = now - self._last_progress[1]
                self._stalled = False
                if idle_for > idle_limit:
                    return f"stalled while idle: no progress for {idle_for:.1f}s (a rank is stuck or a link " \
                           "between ranks is lost)"
                return None
            # Only busy time is judged: while idle the clock keeps up, so work that starts after a long
            # quiet spell gets the whole stall timeout, like work that starts a second after the last.
            self._last_progress = (self._last_progress[0], now)
            self._stalled = False
            return None
        limit = self._policy.load_timeout_s if self._loading() or self._starting() else self._policy.stall_timeout_s
        idle_for = now - self._last_progress[1]
        self._stalled = idle_for > limit
        # Report "stalled" first (health 503), kill a little later: a stall can still resolve itself
        # (one huge prefill chunk on a slow machine), and the operator sees the state either way.
        if self._stalled and idle_for > limit + max(1.0, limit / 2):
            return f"made no progress for {idle_for:.1f}s with work pending (stalled)"
        return None

    async def _read_events(self, process: EngineProcess | GroupProcess) -> None:
        assert process.channel is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                for event in await process.channel.receive_many():  # a whole step's frames at once
                    if type(event) is Delta:  # the per-token case first: straight to its request
                        if timeline.ACTIVE:
                            _stamp_received(event)
                        request = self._requests.get(event.request_id)
                        if request is not None:
                            request.deliver(event)  # a Delta never ends a request: it stays in _requests
                    elif isinstance(event, Heartbeat):
                        self._on_heartbeat(event)
                    elif isinstance(event, ModelControlDone):
                        self._answer_control(event)
                    elif isinstance(event, ModelEvent):
                        self._observer.on_model_event(event)
                    elif isinstance(event, Ready):
                        self._ready = event
                        self._state = EngineState.UP
                        self._last_heartbeat_at = time.monotonic()
                        self._last_progress = (self._last_progress[0], self._last_heartbeat_at)  # starting: no stall
                        self._up.set()
                        log.info("engine ready (pid %d, device %s, mlx %s, mlx-lm %s)",
                                 event.pid, event.device, event.mlx_version, event.mlx_lm_version)
                    elif isinstance(event, Hello | RankHeartbeat | Wake):
                        continue  # a group's own traffic (GroupChannel keeps it; never a request's)
                    else:
                        if timeline.ACTIVE:
                            _stamp_received(event)
                        self._route(event)

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        now = time.monotonic()
        self._last_heartbeat_at = now
        self._load_announced = False  # the heartbeat says itself whether a load runs
        # Progress, or the end of start-up (bounded by the load timeout meanwhile): waiting work gets a whole
        # stall timeout from here, not one already spent on the engine's imports.
        if heartbeat.progress != self._last_progress[0] or (self._starting() and not heartbeat.starting):
            self._last_progress = (heartbeat.progress, now)
        self._heartbeat = heartbeat
        self._observer.on_heartbeat(heartbeat)

    def _answer_control(self, done: ModelControlDone) -> None:
        future = self._controls.get(done.request_id)
        if future is None or future.done():
            return
        if done.code is None:
            future.set_result(None)
        else:
            future.set_exception(EngineError.from_wire(done.code, done.message, "model"))

    def _route(self, event: Loading | Started | Delta | Finished | PromptCount | Failed) -> None:
        if isinstance(event, Loading):
            self._load_announced = True
        answer = self._counts.get(event.request_id)
        if answer is not None:
            if not answer.done() and isinstance(event, PromptCount):
                answer.set_result(event.prompt_tokens)
            elif not answer.done() and isinstance(event, Failed):
                answer.set_exception(EngineError.from_wire(event.code, event.message, event.param))
            return
        if isinstance(event, PromptCount):
            return  # its waiter gave up
        request = self._requests.get(event.request_id)
        if request is None:  # its owner ended it: the engine's last word on it only feeds the counts
            if isinstance(event, Finished | Failed) and event.request_id in self._aborted:
                self._aborted.discard(event.request_id)
                if isinstance(event, Finished):
                    self._observer.on_cancelled(event)
            return
        if isinstance(event, Failed):
            del self._requests[event.request_id]
            request.deliver(EngineError.from_wire(event.code, event.message, event.param))
            return
        request.deliver(event)
        if request.ended:
            del self._requests[event.request_id]


def _stamp_received(event: Loading | Started | Delta | Finished | PromptCount | Failed) -> None:
    """Timeline: when a request's frame was read and decoded here (records R, keyed as the engine's E)."""
    if isinstance(event, Delta):
        timeline.record("R", event.request_id, timeline.count(event.request_id, event.tokens), event.tokens,
                        timeline.now())
    elif isinstance(event, Finished | Failed):
        timeline.forget(event.request_id)
