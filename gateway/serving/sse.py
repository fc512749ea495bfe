"""Server-sent events: OpenAI chat's `data: <json>` frames ending with `data: [DONE]`, and the named
`event: <type>` + `data: <json>` frames of the Responses and Messages APIs (which send no [DONE])."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

JSON_ENCODER = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer tokens


def event(payload: Any) -> bytes:
    return b"data: " + JSON_ENCODER.encode(payload) + b"\n\n"


def named_event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + JSON_ENCODER.encode(payload) + b"\n\n"


class TextSlot:
    """One kind of event whose only varying part is a JSON string (a token's text): the event is rendered
    once with a marker in that place and split there, so each later one is `prefix + JSON(text) + suffix`,
    the very bytes `event` would give for the payload holding `text` (the same encoder writes the string),
    at about a tenth of the cost of building and encoding the payload per token."""

    _MARKER = "\ue000mlx-gateway-text-slot\ue001"  # private-use characters: never in a rendered payload

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        self._prefix = prefix
        self._suffix = suffix

    @classmethod
    def of(cls, render: Callable[[str], bytes]) -> TextSlot | None:
        """From `render(text)`, an event with `text` in it; None unless the text shows exactly once."""
        parts = render(cls._MARKER).split(JSON_ENCODER.encode(cls._MARKER))
        return cls(parts[0], parts[1]) if len(parts) == 2 else None

    def event(self, text: str) -> bytes:
        return self._prefix + JSON_ENCODER.encode(text) + self._suffix
