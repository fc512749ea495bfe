"""Server-sent events: OpenAI chat's `data: <json>` frames ending with `data: [DONE]`, and the named
`event: <type>` + `data: <json>` frames of the Responses and Messages APIs (which send no [DONE])."""

from __future__ import annotations

from typing import Any

from gateway.protocol import JSON_ENCODER

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer tokens


def event(payload: Any) -> bytes:
    return b"data: " + JSON_ENCODER.encode(payload) + b"\n\n"


def named_event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + JSON_ENCODER.encode(payload) + b"\n\n"
