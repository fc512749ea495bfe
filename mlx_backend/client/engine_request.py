"""One request's channel from the engine to its owner in the gateway (gateway/serving/exchange.py): its events in
order, merged where a consumer fell behind, and `interrupt`, the one way to stop it early. The engine client
(mlx_backend/client/engine.py) delivers into it; nothing here knows about processes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from mlx_backend.contract import Delta, Finished, Loading, Started
from mlx_backend.errors import EngineError

GenerationEvent = Loading | Started | Delta | Finished


class Interrupted(Exception):
    """Raised by `EngineRequest.next` once its owner interrupted it (timeout, client gone, drain)."""


class EngineRequest:
    """One request's channel from the engine: its events in order, and the one way to stop it early.

    The engine ends a request with Finished or Failed; until then `interrupt` is how its owner ends it:
    the engine is told to abort (once) and a consumer waiting in `next` wakes with Interrupted.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None], choices: int = 1) -> None:
        self.request_id = request_id
        self._abort = abort
        self._choices_left = choices  # a Finished ends one choice; the request ends with the last
        # A deque and one waiter rather than an asyncio.Queue: one producer, one consumer, and this is
        # the per-token path (a Queue's get/put cost several times more).
        self._items: deque[GenerationEvent | EngineError | Interrupted] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._held: GenerationEvent | EngineError | Interrupted | None = None  # taken, not handed out yet
        self.ended = False  # the engine is done with it: Finished, Failed, or aborted by its owner

    def deliver(self, item: GenerationEvent | EngineError) -> None:
        """The engine client's side: the next event, or the error that ends the request."""
        if isinstance(item, Finished):
            self._choices_left -= 1
        if isinstance(item, EngineError) or self._choices_left <= 0:
            self.ended = True
        self._put(item)

    def _put(self, item: GenerationEvent | EngineError | Interrupted) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> GenerationEvent:
        """The next event; raises EngineError when the engine failed it, Interrupted once interrupted.

        Deltas already waiting are merged into one: a consumer that falls behind (a slow client, a busy
        event loop) catches up in one chunk instead of one per token, and a fast one is never delayed."""
        item = self._held
        self._held = None
        if item is None:
            while not self._items:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._items.popleft()
        items = self._items
        while isinstance(item, Delta) and items:
            following = items[0]
            # Another choice's Delta, and text after a tool-call piece (merged, it would read as coming
            # first), stay Deltas of their own.
            if not isinstance(following, Delta) or following.index != item.index or (
                item.tool_calls and following.text
            ) or ((item.text or item.tool_calls) and following.reasoning):  # reasoning after text: its own too
                break
            items.popleft()
            item = Delta(item.request_id, item.text + following.text, item.tokens + following.tokens,
                         item.tool_calls + following.tool_calls, item.logprobs + following.logprobs, item.index,
                         item.reasoning + following.reasoning)
        if isinstance(item, EngineError | Interrupted):
            self._held = item  # the request is over: every later call raises the same
            raise item
        return item

    def interrupt(self) -> None:
        """End it early: abort it in the engine unless the engine already ended it; wake the consumer."""
        if not self.ended:
            self.ended = True
            self._abort(self.request_id)
        self._put(Interrupted())
