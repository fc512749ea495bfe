"""Server-sent events as OpenAI streams them: `data: <json>` frames, then `data: [DONE]`."""

from __future__ import annotations

from typing import Any

from gateway.protocol import JSON_ENCODER

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer tokens


def event(payload: Any) -> bytes:
    return b"data: " + JSON_ENCODER.encode(payload) + b"\n\n"
