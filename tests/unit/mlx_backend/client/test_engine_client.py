"""EngineClient supervision against a scripted engine process (real process, real socket, no MLX)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from mlx_backend.client.engine import EngineClient, EngineState
from mlx_backend.client.engine_request import Interrupted
from mlx_backend.client.supervision import SupervisionPolicy
from mlx_backend.contract import (
    EngineConfig,
    Finished,
    Generate,
    Heartbeat,
    ModelEvent,
    SamplingParams,
)
from mlx_backend.errors import EngineError, EngineErrorCode

pytestmark = pytest.mark.anyio
_ids = itertools.count()


class Recorder:
    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.cancelled: list[Finished] = []
        self.down: list[str] = []
        self.heartbeats = 0
        self.model_events: list[ModelEvent] = []

    def on_down(self, reason: str) -> None:
        self.down.append(reason)

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.heartbeats += 1

    def on_restart(self, reason: str) -> None:
        self.restarts.append(reason)

    def on_cancelled(self, finished: Finished) -> None:
        self.cancelled.append(finished)

    def on_model_event(self, event: ModelEvent) -> None:
        self.model_events.append(event)


def command(prompt: str, max_tokens: int = 100) -> Generate:
    return Generate(request_id=f"r{next(_ids)}", model="m", params=SamplingParams(max_tokens=max_tokens),
                    prompt=prompt)


async def collect(client: EngineClient, cmd: Generate) -> tuple[str, Finished]:
    request = client.submit(cmd)
    text = ""
    while True:
        event = await request.next()
        if isinstance(event, Finished):
            return text, event
        text += getattr(event, "text", "")


@pytest.fixture
async def client() -> AsyncIterator[tuple[EngineClient, Recorder]]:
    recorder = Recorder()
    policy = SupervisionPolicy(stall_timeout_s=1.5, heartbeat_timeout_s=0.6, restart_budget=3)
    engine = EngineClient(EngineConfig(heartbeat_interval_s=0.1), recorder, policy,
                          worker_module="tests.support.scripted_worker")
    await engine.start()
    assert await engine.wait_until_up(30)
    yield engine, recorder
    await engine.stop()


async def wait_up(engine: EngineClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.status().state != EngineState.UP:
        assert time.monotonic() < deadline, engine.status()
        await asyncio.sleep(0.05)


async def test_requests_stream_their_events_and_finish(client: tuple[EngineClient, Recorder]) -> None:
    engine, recorder = client
    text, finished = await collect(engine, command("one two three"))
    assert text == "one two three " and finished.completion_tokens == 3 and finished.finish_reason == "stop"
    assert recorder.heartbeats > 0 and engine.in_flight == 0


async def test_interrupting_aborts_in_the_engine_and_counts_the_cancelled_tokens(
    client: tuple[EngineClient, Recorder],
) -> None:
    engine, recorder = client
    request = engine.submit(command("a " * 50))
    while not getattr(await request.next(), "text", ""):
        pass
    request.interrupt()
    with pytest.raises(Interrupted):
        await request.next()
    assert engine.in_flight == 0
    deadline = time.monotonic() + 5
    while not recorder.cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert recorder.cancelled and recorder.cancelled[0].finish_reason == "abort"
    assert recorder.cancelled[0].completion_tokens < 50


async def test_a_dead_engine_fails_every_request_at_once_and_comes_back(client: tuple[EngineClient, Recorder]) -> None:
    engine, _recorder = client
    pid = engine.status().pid
    assert pid
    waiting = [asyncio.create_task(collect(engine, command("x " * 200))) for _ in range(4)]
    await asyncio.sleep(0.2)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert time.monotonic() - killed_at < 1.0
    assert all(isinstance(r, EngineError) and r.code == EngineErrorCode.ENGINE_UNAVAILABLE for r in results)
    assert "SIGKILL" in str(results[0])
    await wait_up(engine)
    assert engine.status().pid != pid and engine.status().restarts == 1
    assert (await collect(engine, command("again")))[0] == "again "


async def test_no_progress_with_work_pending_is_a_stall(client: tuple[EngineClient, Recorder]) -> None:
    engine, recorder = client
    with pytest.raises(EngineError) as stalled:
        await collect(engine, command("stall now"))
    assert "stalled" in stalled.value.message
    await wait_up(engine)
    assert recorder.restarts and "stalled" in recorder.restarts[0]


async def test_missing_heartbeats_mean_frozen(client: tuple[EngineClient, Recorder]) -> None:
    engine, recorder = client
    with pytest.raises(EngineError):
        await collect(engine, command("freeze"))
    await wait_up(engine)
    assert "heartbeat" in recorder.restarts[0]


async def test_a_load_that_keeps_the_heartbeat_thread_from_running_is_not_a_freeze(
    client: tuple[EngineClient, Recorder],
) -> None:
    """Seen on an H200: a tokenizer with a 128k vocabulary held the GIL for seconds while its model loaded,
    and the engine was killed as frozen. Once the engine says a model loads, silence is allowed longer."""
    engine, recorder = client
    text, finished = await collect(engine, command("slowload then words"))
    assert text == "slowload then words " and finished.finish_reason == "stop"
    assert recorder.restarts == []


async def test_a_request_waiting_while_the_engine_still_starts_is_not_a_stall(
    client: tuple[EngineClient, Recorder],
) -> None:
    """Seen on a busy 2-core machine: after Ready, importing mlx-lm took 3 to 9 s while a request waited, and
    a 2 s stall limit killed the engine, again after each restart. Start-up is judged like a load."""
    engine, recorder = client
    text, finished = await collect(engine, command("slowstart then words"))  # 4 s: past the 2.25 s kill point
    assert text == "slowstart then words " and finished.finish_reason == "stop"
    assert recorder.restarts == []


async def test_the_restart_budget_ends_in_down_not_a_crash_loop(client: tuple[EngineClient, Recorder]) -> None:
    engine, recorder = client
    for _ in range(4):
        await wait_up(engine)
        with pytest.raises(EngineError):
            await collect(engine, command("die"))
    deadline = time.monotonic() + 10
    while engine.status().state != EngineState.DOWN:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises(EngineError) as down:
        await collect(engine, command("hello"))
    assert "restarting" in down.value.message and len(recorder.restarts) == 4
    assert len(recorder.down) == 1  # told once, so the gateway can exit and its service manager restart it


async def test_an_idle_spell_longer_than_the_stall_timeout_is_not_a_stall(
    client: tuple[EngineClient, Recorder],
) -> None:
    """The first request after a quiet spell gets the whole stall timeout (issue 15: a coffee break
    killed a healthy engine)."""
    engine, recorder = client
    await collect(engine, command("warm up"))
    await asyncio.sleep(1.5 * 2.5 + 0.5)  # idle well past the kill point (stall 1.5 s, killed at 1.5x)
    assert engine.status().stalled is False and engine.status().seconds_since_progress is None
    words = "after the break " * 10  # long enough (0.6 s) for the supervisor to judge it while it runs
    text, finished = await collect(engine, command(words))
    assert text == words and finished.finish_reason == "stop"
    assert recorder.restarts == [] and engine.status().restarts == 0


async def test_backoff_starts_over_after_a_healthy_spell_and_grows_in_a_crash_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = SupervisionPolicy(heartbeat_timeout_s=0.6, restart_budget=10, healthy_after_s=1.0)
    engine = EngineClient(EngineConfig(heartbeat_interval_s=0.1), Recorder(), policy,
                          worker_module="tests.support.scripted_worker")
    await engine.start()
    caplog.set_level("WARNING", logger="mlx_gateway.engine")
    try:
        for _ in range(2):  # crash loop: each process dies at once
            await wait_up(engine)
            with pytest.raises(EngineError):
                await collect(engine, command("die"))
        for _ in range(2):  # healthy spells between failures
            await wait_up(engine)
            await asyncio.sleep(1.2)
            with pytest.raises(EngineError):
                await collect(engine, command("die"))
        await wait_up(engine)
    finally:
        await engine.stop()
    messages = [r.getMessage() for r in caplog.records]
    delays = [m.rsplit("restarting in ", 1)[1] for m in messages if "restarting in" in m]
    assert delays == ["0.5s", "1.0s", "0.5s", "0.5s"]


async def test_stop_asks_the_engine_to_exit_and_leaves_no_process(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    pid = engine.status().pid
    assert pid
    await engine.stop()
    assert engine.status().state == EngineState.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_count_prompt_is_answered_without_a_request(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    assert await engine.count_prompt(command("one two three four")) == 4
    assert engine.in_flight == 0


async def test_a_dead_engine_fails_a_pending_count(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    with pytest.raises(EngineError) as failure:
        await engine.count_prompt(command("die now"))
    assert failure.value.code == EngineErrorCode.ENGINE_UNAVAILABLE
    await wait_up(engine)
    assert await engine.count_prompt(command("back again")) == 2


async def test_operator_commands_are_answered_and_pins_survive_a_restart(
    client: tuple[EngineClient, Recorder]
) -> None:
    engine, recorder = client
    await engine.control("pin", "m2")
    await engine.control("load", "m3")
    with pytest.raises(EngineError) as info:
        await engine.control("load", "nope")
    assert info.value.code == EngineErrorCode.MODEL_NOT_FOUND and info.value.param == "model"
    pid = engine.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine.status().pid in (None, pid) or engine.status().heartbeat is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    heartbeat = engine.status().heartbeat
    assert heartbeat is not None and [m.id for m in heartbeat.loaded if m.pinned] == ["m2"]  # the new process has it
    await engine.control("unpin", "m2")
    os.kill(engine.status().pid or 0, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine.status().heartbeat is None or any(m.pinned for m in engine.status().heartbeat.loaded):  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert len(recorder.restarts) == 2


async def test_an_operator_command_waiting_on_a_dying_engine_fails_as_unavailable(
    client: tuple[EngineClient, Recorder]
) -> None:
    engine, _ = client
    pid = engine.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the command is sent but never answered; the heartbeat stops too
    try:
        with pytest.raises(EngineError) as info:
            await asyncio.wait_for(engine.control("load", "m"), 20)
        assert info.value.code == EngineErrorCode.ENGINE_UNAVAILABLE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
async def test_the_engine_process_runs_on_the_cpus_it_was_given() -> None:
    cpu = min(os.sched_getaffinity(0))
    engine = EngineClient(EngineConfig(heartbeat_interval_s=0.1, cpu_affinity=(cpu,)), Recorder(),
                          worker_module="tests.support.scripted_worker")
    await engine.start()
    try:
        assert await engine.wait_until_up(30)
        pid = engine.status().pid
        assert pid and os.sched_getaffinity(pid) == {cpu}
        assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1  # ours is untouched
    finally:
        await engine.stop()
