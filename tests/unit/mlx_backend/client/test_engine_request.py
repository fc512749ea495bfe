"""A request's channel from the engine: events in order, Deltas merged for a consumer that fell behind
(never across choices or past a tool call), and interrupt as the one early end, aborting at most once."""

from __future__ import annotations

import asyncio

import pytest

from mlx_backend.client.engine_request import EngineRequest, Interrupted
from mlx_backend.contract import Delta, Finished, Started, ToolCallDelta

pytestmark = pytest.mark.anyio


async def test_deltas_waiting_together_are_handed_out_as_one() -> None:
    request = EngineRequest("r", lambda rid: None)
    for event in (Started("r", 3, 0), Delta("r", "a", 1), Delta("r", "b", 2), Finished("r", "stop", 3, 3, 0)):
        request.deliver(event)
    assert await request.next() == Started("r", 3, 0)
    assert await request.next() == Delta("r", "ab", 3)
    assert await request.next() == Finished("r", "stop", 3, 3, 0)
    assert request.ended


async def test_merged_deltas_keep_every_tool_call_piece_in_order() -> None:
    request = EngineRequest("r", lambda rid: None)
    first, more = ToolCallDelta(0, "call_1", "f", '{"a"'), ToolCallDelta(0, arguments=": 1}")
    for event in (Delta("r", "Let me check.", 1), Delta("r", "", 1, (first,)), Delta("r", "", 1, (more,)),
                  Delta("r", "Done", 1), Finished("r", "tool_calls", 3, 4, 0)):
        request.deliver(event)
    assert await request.next() == Delta("r", "Let me check.", 3, (first, more))
    assert await request.next() == Delta("r", "Done", 1)  # text after a call is never merged ahead of it
    assert isinstance(await request.next(), Finished)


async def test_merged_deltas_keep_the_reasoning_and_never_put_it_after_text() -> None:
    request = EngineRequest("r", lambda rid: None)
    for event in (Delta("r", "", 1, reasoning="I "), Delta("r", "", 1, reasoning="think."), Delta("r", "So", 1),
                  Delta("r", "", 1, reasoning="Again."), Finished("r", "stop", 3, 4, 0)):
        request.deliver(event)
    assert await request.next() == Delta("r", "So", 3, reasoning="I think.")  # reasoning first, then text
    assert await request.next() == Delta("r", "", 1, reasoning="Again.")
    assert isinstance(await request.next(), Finished)


async def test_interrupt_aborts_once_only_while_the_engine_still_runs_it() -> None:
    aborted: list[str] = []
    running = EngineRequest("r1", aborted.append)
    running.deliver(Started("r1", 3, 0))
    running.interrupt()
    running.interrupt()
    assert aborted == ["r1"]
    assert await running.next() == Started("r1", 3, 0)  # what came before is still handed out, then the end
    with pytest.raises(Interrupted):
        await running.next()
    finished = EngineRequest("r2", aborted.append)
    finished.deliver(Finished("r2", "stop", 1, 1, 0))
    finished.interrupt()
    assert aborted == ["r1"]  # the engine had ended it: nothing to abort


async def test_a_waiting_consumer_wakes_for_the_next_event_and_for_an_interrupt() -> None:
    request = EngineRequest("r", lambda rid: None)
    waiting = asyncio.create_task(request.next())
    await asyncio.sleep(0)
    assert not waiting.done()
    request.deliver(Delta("r", "x", 1))
    assert await asyncio.wait_for(waiting, 1) == Delta("r", "x", 1)
    waiting = asyncio.create_task(request.next())
    await asyncio.sleep(0)
    request.interrupt()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(Interrupted):  # and every later call says the same
        await request.next()


async def test_a_consumer_cancelled_while_waiting_leaves_the_request_usable() -> None:
    request = EngineRequest("r", lambda rid: None)
    waiting = asyncio.create_task(request.next())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    request.deliver(Delta("r", "y", 1))
    assert await asyncio.wait_for(request.next(), 1) == Delta("r", "y", 1)
