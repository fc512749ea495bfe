"""EngineClient supervision against a scripted engine process (real process, real socket, no MLX)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from mlx_backend.engine import EngineClient, EngineState, SupervisionPolicy
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.types import EngineConfig, Finished, Generate, Heartbeat, SamplingParams

pytestmark = pytest.mark.anyio
_ids = itertools.count()


class Recorder:
    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.cancelled: list[Finished] = []
        self.heartbeats = 0

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.heartbeats += 1

    def on_restart(self, reason: str) -> None:
        self.restarts.append(reason)

    def on_cancelled(self, finished: Finished) -> None:
        self.cancelled.append(finished)


def command(prompt: str, max_tokens: int = 100) -> Generate:
    return Generate(request_id=f"r{next(_ids)}", model="m", params=SamplingParams(max_tokens=max_tokens),
                    prompt=prompt)


async def collect(client: EngineClient, cmd: Generate) -> tuple[str, Finished]:
    text = ""
    async for event in client.generate(cmd):
        if isinstance(event, Finished):
            return text, event
        text += getattr(event, "text", "")
    raise AssertionError("no Finished")


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


async def test_leaving_early_aborts_and_counts_the_cancelled_tokens(client: tuple[EngineClient, Recorder]) -> None:
    engine, recorder = client
    events = engine.generate(command("a " * 50))
    async for event in events:
        if getattr(event, "text", ""):
            break
    await events.aclose()  # type: ignore[attr-defined]
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
    assert "operator" in down.value.message and len(recorder.restarts) == 4


async def test_end_all_finishes_requests_with_their_counts(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    task = asyncio.create_task(collect(engine, command("w " * 100)))
    await asyncio.sleep(0.3)
    assert engine.end_all("length") == 1
    text, finished = await task
    assert finished.finish_reason == "length" and finished.completion_tokens == len(text.split()) > 0


async def test_request_timeout_is_an_error_and_frees_the_request(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    with pytest.raises(EngineError) as timed_out:
        async for _ in engine.generate(command("w " * 100), timeout_s=0.3):
            pass
    assert timed_out.value.code == EngineErrorCode.REQUEST_TIMEOUT and engine.in_flight == 0


async def test_stop_asks_the_engine_to_exit_and_leaves_no_process(client: tuple[EngineClient, Recorder]) -> None:
    engine, _ = client
    pid = engine.status().pid
    assert pid
    await engine.stop()
    assert engine.status().state == EngineState.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_deltas_waiting_together_are_handed_out_as_one() -> None:
    from mlx_backend.engine import _Pending
    from mlx_backend.types import Delta, Started

    pending = _Pending()
    for event in (Started("r", 3, 0), Delta("r", "a", 1), Delta("r", "b", 2), Finished("r", "stop", 3, 3, 0)):
        pending.queue.put_nowait(event)
    assert await pending.take() == Started("r", 3, 0)
    assert await pending.take() == Delta("r", "ab", 3)
    assert await pending.take() == Finished("r", "stop", 3, 3, 0)
