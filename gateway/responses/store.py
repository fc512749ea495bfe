"""Recent Responses API responses, in memory, so a conversation can go on by `previous_response_id`.

Each stored response keeps its own turn only (the new input it was given and its reply, as chat messages)
and the id it continued, so a conversation of n turns costs n turns, not n^2. The store is bounded in
bytes (the turns' text plus the response's JSON) and forgets the least recently used first; it lives in
the server process, so a restart loses it (documented in docs/api.md). A continuation whose chain has a
forgotten link is refused: a silently shortened conversation would be worse.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from gateway.responses.wire import ResponseObject
from mlx_backend.contract import ChatMessage


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    turn: tuple[ChatMessage, ...]  # this response's new input and its reply, without instructions
    size: int


def _size(response: ResponseObject, turn: tuple[ChatMessage, ...]) -> int:
    text = sum(len(m.content) + sum(len(c.arguments) + len(c.name) + len(c.id) for c in m.tool_calls) for m in turn)
    return len(msgspec.json.encode(response)) + text + 64 * len(turn)


class ResponseStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()  # the event loop is the only user; the lock keeps it obviously safe

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: ResponseObject, turn: tuple[ChatMessage, ...]) -> bool:
        """Keep it (False when it alone is larger than the whole store)."""
        stored = StoredResponse(response, turn, _size(response, turn))
        if stored.size > self.max_bytes:
            return False
        with self._lock:
            self._drop(response.id)
            self._items[response.id] = stored
            self.bytes += stored.size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is not None:
                self._items.move_to_end(response_id)
            return stored

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def conversation(self, response_id: str) -> tuple[ChatMessage, ...] | None:
        """Every turn up to and including `response_id`'s, oldest first; None if any link is gone."""
        turns: list[tuple[ChatMessage, ...]] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None:
            stored = self.get(current)  # touched: a conversation in use stays
            if stored is None or current in seen:
                return None
            seen.add(current)
            turns.append(stored.turn)
            current = stored.response.previous_response_id
        return tuple(m for turn in reversed(turns) for m in turn)

    def _drop(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True
