"""gateway/app.py's middleware at the ASGI level: the body timeout (a client that stops sending its body)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from gateway.app import BodyTimeoutMiddleware, create_asgi_app
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.registry import ModelRegistry

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, Any]
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()


def scope() -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
            "root_path": "", "server": ("127.0.0.1", 11435), "client": ("127.0.0.1", 50000),
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(BODY)).encode())]}


async def nothing_sent(message: Message) -> None:
    raise AssertionError(f"nothing should be sent, got {message}")


def receiving(*messages: Message, pause_s: float = 0.0) -> Any:
    """An ASGI receive handing out `messages` `pause_s` apart, then hanging like a client gone quiet."""
    queue = list(messages)
    handed = 0

    async def receive() -> Message:
        nonlocal handed
        if not queue:
            await asyncio.sleep(3600)
        if handed:
            await asyncio.sleep(pause_s)
        handed += 1
        return queue.pop(0)

    return receive


async def test_a_body_that_stops_halfway_is_answered_408_with_openai_s_error_and_connection_close(
    tmp_path: Path,
) -> None:
    settings = Settings(models_dirs=(tmp_path,), hf_cache=False, demo_model=False, body_timeout_s=0.2)
    app = create_asgi_app(GatewayRuntime(settings, FakeEngine(), ModelRegistry(settings.models_dirs, None, False)))
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    started = time.monotonic()
    first_half = {"type": "http.request", "body": BODY[:10], "more_body": True}
    await asyncio.wait_for(app(scope(), receiving(first_half), send), 5)
    assert time.monotonic() - started < 1
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert start["status"] == 408 and headers["connection"] == "close" and "x-request-id" in headers
    error = json.loads(body)["error"]
    assert error["code"] == "request_body_timeout" and error["type"] == "invalid_request_error"


async def test_pauses_shorter_than_the_timeout_pass_however_long_the_whole_body_takes() -> None:
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            got.append(message["body"])
            if not message.get("more_body"):
                return

    pieces = [{"type": "http.request", "body": bytes([b]), "more_body": True} for b in BODY[:-1]][:8]
    pieces.append({"type": "http.request", "body": b"!", "more_body": False})
    middleware = BodyTimeoutMiddleware(app, timeout_s=0.1)
    await middleware(scope(), receiving(*pieces, pause_s=0.05), nothing_sent)  # 9 pieces: 0.4 s in all
    assert len(got) == 9


async def test_once_the_body_is_in_receive_waits_for_the_disconnect_untimed() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the whole body
        events.append((await receive())["type"])  # what a disconnect watcher waits for, long after

    middleware = BodyTimeoutMiddleware(app, timeout_s=0.05)
    whole = {"type": "http.request", "body": BODY, "more_body": False}
    await middleware(scope(), receiving(whole, {"type": "http.disconnect"}, pause_s=0.2), nothing_sent)
    assert events == ["http.disconnect"]


async def test_a_timeout_of_zero_times_nothing() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    middleware = BodyTimeoutMiddleware(app, timeout_s=0)
    first_half = {"type": "http.request", "body": BODY[:10], "more_body": True}
    rest = {"type": "http.request", "body": BODY[10:]}
    await asyncio.wait_for(middleware(scope(), receiving(first_half, rest, pause_s=0.1), nothing_sent), 1)
