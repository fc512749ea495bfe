"""Who waits on the engine: each answer reaches its waiter, an ended request's last word only feeds the
counts, and when the engine goes every waiter is ended with the same error."""

from __future__ import annotations

import pytest

from mlx_backend.client.engine_request import EngineRequest
from mlx_backend.client.pending import PendingReplies
from mlx_backend.contract import Delta, Failed, Finished, ModelControlDone, PromptCount, Started
from mlx_backend.errors import EngineError, EngineErrorCode

pytestmark = pytest.mark.anyio


def pending_with_cancelled() -> tuple[PendingReplies, list[Finished]]:
    cancelled: list[Finished] = []
    return PendingReplies(cancelled.append), cancelled


async def test_a_request_gets_its_events_and_is_forgotten_when_it_ends() -> None:
    pending, _ = pending_with_cancelled()
    request = EngineRequest("r", lambda rid: None)
    pending.add_request(request)
    assert pending.busy() and pending.requests == 1 and pending.is_taken("r")
    pending.route(Started("r", 3, 0))
    pending.deliver_delta(Delta("r", "hi", 1))
    pending.route(Finished("r", "stop", 3, 1, 0))
    assert [await request.next() for _ in range(3)] == [Started("r", 3, 0), Delta("r", "hi", 1),
                                                        Finished("r", "stop", 3, 1, 0)]
    assert not pending.busy() and pending.requests == 0


async def test_an_aborted_requests_finish_is_counted_as_cancelled_once() -> None:
    pending, cancelled = pending_with_cancelled()
    pending.add_request(EngineRequest("r", lambda rid: None))
    assert pending.drop_request("r") and not pending.drop_request("r")
    pending.mark_aborted("r")
    pending.route(Finished("r", "abort", 3, 2, 0))
    pending.route(Finished("r", "abort", 3, 2, 0))
    assert cancelled == [Finished("r", "abort", 3, 2, 0)]


async def test_counts_and_admin_commands_get_their_answers() -> None:
    pending, _ = pending_with_cancelled()
    count = pending.new_count("c")
    pending.route(PromptCount("c", 42))
    assert await count == 42
    failed = pending.new_count("f")
    pending.route(Failed("f", EngineErrorCode.MODEL_NOT_FOUND.value, "no such model"))
    with pytest.raises(EngineError, match="no such model"):
        await failed
    control_id, control = pending.new_control()
    pending.answer_control(ModelControlDone(control_id, EngineErrorCode.MODEL_LOAD_FAILED.value, "broken"))
    with pytest.raises(EngineError, match="broken") as info:
        await control
    assert info.value.param == "model"


async def test_when_the_engine_goes_every_waiter_ends_with_its_error() -> None:
    pending, _ = pending_with_cancelled()
    request = EngineRequest("r", lambda rid: None)
    pending.add_request(request)
    count = pending.new_count("c")
    _, control = pending.new_control()
    error = EngineError(EngineErrorCode.ENGINE_UNAVAILABLE, "gone")
    pending.fail_all(error)
    assert pending.requests == 0
    with pytest.raises(EngineError, match="gone"):
        await request.next()
    for future in (count, control):
        with pytest.raises(EngineError, match="gone"):
            await future
