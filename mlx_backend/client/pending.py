"""What the gateway waits on from the engine, by id: the requests' handles, prompt counts and admin commands.
Each answer the engine sends goes to its waiter; when the engine goes, every waiter is ended at once."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from mlx_backend.client.engine_request import EngineRequest
from mlx_backend.contract import Delta, Failed, Finished, Loading, ModelControlDone, PromptCount, Started
from mlx_backend.errors import EngineError


class PendingReplies:
    def __init__(self, on_cancelled: Callable[[Finished], None]) -> None:
        self._on_cancelled = on_cancelled  # a request its owner ended, finished by the engine anyway
        self._requests: dict[str, EngineRequest] = {}
        self._counts: dict[str, asyncio.Future[int]] = {}  # CountPrompt requests waiting for their answer
        self._aborted: set[str] = set()
        self._controls: dict[str, asyncio.Future[None]] = {}  # admin commands waiting for their answer
        self._control_ids = itertools.count(1)

    @property
    def requests(self) -> int:
        return len(self._requests)

    def busy(self) -> bool:
        """Whether anything waits on the engine."""
        return bool(self._requests or self._counts or self._controls)

    def has_request(self, rid: str) -> bool:
        return rid in self._requests

    def is_taken(self, rid: str) -> bool:
        return rid in self._requests or rid in self._counts

    def add_request(self, request: EngineRequest) -> None:
        self._requests[request.request_id] = request

    def drop_request(self, rid: str) -> bool:
        """Forget a request its owner ended; whether it was still pending."""
        return self._requests.pop(rid, None) is not None

    def mark_aborted(self, rid: str) -> None:
        """The engine was told to abort it: its last word only feeds the counts."""
        self._aborted.add(rid)

    def new_count(self, rid: str) -> asyncio.Future[int]:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._counts[rid] = answer
        return answer

    def forget_count(self, rid: str) -> None:
        self._counts.pop(rid, None)

    def new_control(self) -> tuple[str, asyncio.Future[None]]:
        request_id = f"control-{next(self._control_ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._controls[request_id] = future
        return request_id, future

    def forget_control(self, request_id: str) -> None:
        self._controls.pop(request_id, None)

    def fail_all(self, error: EngineError) -> None:
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

    def deliver_delta(self, event: Delta) -> None:
        """The per-token case: straight to its request (a Delta never ends one: it stays pending)."""
        request = self._requests.get(event.request_id)
        if request is not None:
            request.deliver(event)

    def answer_control(self, done: ModelControlDone) -> None:
        future = self._controls.get(done.request_id)
        if future is None or future.done():
            return
        if done.code is None:
            future.set_result(None)
        else:
            future.set_exception(EngineError.from_wire(done.code, done.message, "model"))

    def route(self, event: Loading | Started | Delta | Finished | PromptCount | Failed) -> None:
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
                    self._on_cancelled(event)
            return
        if isinstance(event, Failed):
            del self._requests[event.request_id]
            request.deliver(EngineError.from_wire(event.code, event.message, event.param))
            return
        request.deliver(event)
        if request.ended:
            del self._requests[event.request_id]
