"""The small interface the gateway sees: submit, status, start, stop.

`EngineClient` supervises one engine process at a time. It routes events to per-request handles
(`EngineRequest`, client/engine_request.py; who waits for what: client/pending.py), watches heartbeats and
progress (client/supervision.py), and when the process dies or stalls it ends every affected request at once
with ENGINE_UNAVAILABLE, kills what is left, and starts a new process with backoff and a restart budget. Once
the budget is spent it stays DOWN and tells its observer, so the gateway can exit and let the service manager
(launchd, systemd, the watchdog) restart the whole server. No MLX here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from mlx_backend import timeline
from mlx_backend.client.engine_request import EngineRequest
from mlx_backend.client.group import GroupProcess, GroupSpec, GroupStatus
from mlx_backend.client.pending import PendingReplies
from mlx_backend.client.process import EngineProcess, describe_exit
from mlx_backend.client.supervision import ProcessWatch, RestartBudget, SupervisionPolicy
from mlx_backend.contract import (
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
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.ipc import ConnectionClosed

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
    """The engine for the gateway: requests in, their events out (`PendingReplies` keeps who waits for what),
    one process at a time watched (`ProcessWatch`) and restarted within a `RestartBudget`."""

    def __init__(
        self,
        config: EngineConfig,
        observer: EngineObserver,
        policy: SupervisionPolicy | None = None,
        extra_env: dict[str, str] | None = None,
        worker_module: str = "mlx_backend.engine.worker",
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
        self._pending = PendingReplies(observer.on_cancelled)
        self._watch = ProcessWatch(self._policy)
        self._budget = RestartBudget(self._policy.restart_budget)
        self._last_exit: str | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
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
        if self._pending.has_request(rid):
            raise ValueError(f"request id {rid} is already in flight")  # ids are the gateway's to keep unique
        try:
            process.channel.send(command)
        except (ConnectionClosed, OSError):
            raise self._unavailable() from None
        request = EngineRequest(rid, lambda r: self._abort(r, process), command.n)
        self._pending.add_request(request)
        return request

    async def count_prompt(self, command: Generate) -> int:
        """The prompt tokens `command` would run with, counted by the engine without running it (loading its
        model if needed). Raises EngineError. Cancelling the wait abandons the answer."""
        process = self._process
        if self._state != EngineState.UP or process is None or process.channel is None:
            raise self._unavailable()
        rid = command.request_id
        if self._pending.is_taken(rid):
            raise ValueError(f"request id {rid} is already in flight")
        answer = self._pending.new_count(rid)
        try:
            process.channel.send(CountPrompt(command))
        except (ConnectionClosed, OSError):
            self._pending.forget_count(rid)
            raise self._unavailable() from None
        try:
            return await answer
        finally:
            self._pending.forget_count(rid)

    def _abort(self, rid: str, process: EngineProcess | GroupProcess) -> None:
        """Its owner ended a request the engine still runs: tell the engine, and count what it wasted."""
        if not self._pending.drop_request(rid):
            return
        if process is self._process and process.channel and self._state == EngineState.UP:
            self._pending.mark_aborted(rid)
            with contextlib.suppress(ConnectionClosed, OSError):
                process.channel.send(Abort(rid))

    @property
    def in_flight(self) -> int:
        return self._pending.requests

    def status(self) -> EngineStatus:
        since = None
        if self._state == EngineState.UP and self._busy():
            since = self._watch.seconds_since_progress()
        process = self._process
        ready = self._watch.ready
        return EngineStatus(
            state=self._state,
            pid=process.pid if process else None,
            restarts=self._budget.restarts,
            device=ready.device if ready else None,
            last_exit=self._last_exit,
            stalled=self._watch.stalled,
            seconds_since_progress=since,
            heartbeat=self._watch.heartbeat if self._state == EngineState.UP else None,
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
        request_id, future = self._pending.new_control()
        try:
            process.channel.send(ModelControl(request_id, action, model))
        except (ConnectionClosed, OSError):
            self._pending.forget_control(request_id)
            raise self._unavailable() from None
        try:
            await future
        finally:
            self._pending.forget_control(request_id)
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
        self._pending.fail_all(EngineError(
            EngineErrorCode.ENGINE_UNAVAILABLE, f"Model engine unavailable: {reason}; the request was ended."
        ))

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
            if not self._budget.take():
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

    async def _run_one_process(self) -> str:
        """Run a process until it dies or must be killed; returns why it ended."""
        config = self._config_for_new_process()
        process: EngineProcess | GroupProcess
        if self._group is not None:
            process = GroupProcess(config, self._group, self._extra_env, self._worker_module)
        else:
            process = EngineProcess(config, self._extra_env, self._worker_module)
        self._process = process
        self._watch.new_process()
        try:
            await process.spawn()
        except OSError as exc:
            return f"could not be started ({exc})"
        self._watch.spawned()
        reader = asyncio.create_task(self._read_events(process), name="engine-reader")
        waiter = asyncio.create_task(process.wait(), name="engine-wait")
        try:
            while True:
                done, _ = await asyncio.wait({reader, waiter}, timeout=0.1)
                if done:
                    break
                problem = self._watch.problem(self._busy()) or process.problem(
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
        return self._watch.busy(self._pending.busy())

    async def _read_events(self, process: EngineProcess | GroupProcess) -> None:
        assert process.channel is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                for event in await process.channel.receive_many():  # a whole step's frames at once
                    if type(event) is Delta:  # the per-token case first: straight to its request
                        if timeline.ACTIVE:
                            _stamp_received(event)
                        self._pending.deliver_delta(event)
                    elif isinstance(event, Heartbeat):
                        self._watch.on_heartbeat(event)
                        self._observer.on_heartbeat(event)
                    elif isinstance(event, ModelControlDone):
                        self._pending.answer_control(event)
                    elif isinstance(event, ModelEvent):
                        self._observer.on_model_event(event)
                    elif isinstance(event, Ready):
                        self._watch.on_ready(event)
                        self._state = EngineState.UP
                        self._up.set()
                        log.info("engine ready (pid %d, device %s, mlx %s, mlx-lm %s)",
                                 event.pid, event.device, event.mlx_version, event.mlx_lm_version)
                    elif isinstance(event, Hello | RankHeartbeat | Wake):
                        continue  # a group's own traffic (GroupChannel keeps it; never a request's)
                    else:
                        if timeline.ACTIVE:
                            _stamp_received(event)
                        if isinstance(event, Loading):
                            self._watch.on_loading()
                        self._pending.route(event)


def _stamp_received(event: Loading | Started | Delta | Finished | PromptCount | Failed) -> None:
    """Timeline: when a request's frame was read and decoded here (records R, keyed as the engine's E)."""
    if isinstance(event, Delta):
        timeline.record("R", event.request_id, timeline.count(event.request_id, event.tokens), event.tokens,
                        timeline.now())
    elif isinstance(event, Finished | Failed):
        timeline.forget(event.request_id)
